"""Sampling: ``MarDiniPipeline`` (one general ``generate`` call and the named tasks) and the ``sample.py`` CLI."""

from mardini.pipeline.pipeline import DenoisingStep, MarDiniPipeline

__all__ = ["DenoisingStep", "MarDiniPipeline"]
