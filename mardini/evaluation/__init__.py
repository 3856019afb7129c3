"""Evaluation: samplers (model and baselines), protocols and their metric suite, training callbacks, the CLI.

See README.md in this folder for the protocols, the commands and how to get the metric weights.
"""

from mardini.evaluation.callbacks import ImageToVideoEval, InterpolationEval
from mardini.evaluation.protocol import EvalProtocol, EvalSuite, RealStatsCache
from mardini.evaluation.samplers import LinearBlend, NearestFrame, PipelineSampler, Sampler, make_sampler
from mardini.evaluation.trajectory import TrajectoryError

__all__ = [
    "EvalProtocol",
    "EvalSuite",
    "ImageToVideoEval",
    "InterpolationEval",
    "LinearBlend",
    "NearestFrame",
    "PipelineSampler",
    "RealStatsCache",
    "Sampler",
    "TrajectoryError",
    "make_sampler",
]
