"""MarDini networks: the planning model, the generation model, attention kernels and named sizes."""

from mardini.models.attention import identity_attention  # `attention()` stays in the submodule (no shadowing)
from mardini.models.generator import Generator
from mardini.models.planner import Planner
from mardini.models.registry import (
    MODEL_SIZES,
    GeneratorConfig,
    PlannerConfig,
    build_generator,
    build_planner,
    list_sizes,
)

__all__ = [
    "MODEL_SIZES",
    "Generator",
    "GeneratorConfig",
    "Planner",
    "PlannerConfig",
    "build_generator",
    "build_planner",
    "identity_attention",
    "list_sizes",
]
