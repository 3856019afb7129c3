"""Lightning glue: the three training stages, EMA, the curriculum callback, checkpoint handling."""

from mardini.lit.base import MarDiniBase
from mardini.lit.curriculum import Curriculum, Milestone
from mardini.lit.generation import GenerationModule
from mardini.lit.joint import MarDiniModule
from mardini.lit.planning import PlanningModule

__all__ = ["MarDiniBase", "PlanningModule", "GenerationModule", "MarDiniModule", "Curriculum", "Milestone"]
