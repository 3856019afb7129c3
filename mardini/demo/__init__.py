"""``make demo``: the main job on CPU -- data, the tiny curriculum chain, evaluation, pictures and a report.

``python -m mardini.demo`` runs it (see :mod:`mardini.demo.main`); ``python -m mardini.demo.data`` only builds and
streams the synthetic set.
"""

from mardini.demo.data import SHARDS, build_synthetic, demo_datamodule, stream_for

__all__ = ["SHARDS", "build_synthetic", "demo_datamodule", "stream_for"]
