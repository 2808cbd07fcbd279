"""The main job: how memory and runtime grow with image resolution, and what fits on a GPU.

>>> from visionscale.study import StudyConfig, run_study, write_outputs
>>> result = run_study(StudyConfig(models=("efficientad_s",), resolutions=(256, 512, 1024)))
>>> result.tile_plans  # the tile that fits each GPU, and the tiles and time of a 5/12/20 MP image

Tiled inference under a memory budget of your own (``ad fit/predict/eval --memory-budget``):

>>> from visionscale.study import parse_budget, plan_tiles
>>> plan = plan_tiles(model, parse_budget("2GiB"), image_size=(3000, 4000))
"""

from visionscale.study.fit import QuadraticFit, fit_quadratic
from visionscale.study.gpus import GPU, GPUS, parse_gpu
from visionscale.study.memory import MemoryEstimate, estimate_component, estimate_model
from visionscale.study.report import write_outputs
from visionscale.study.sweep import StudyConfig, StudyError, StudyResult, run_study
from visionscale.study.tiles import BudgetTooSmallError, TilePlan, parse_budget, plan_tiles, tile_need_bytes

__all__ = [
    "GPU", "GPUS", "BudgetTooSmallError", "MemoryEstimate", "QuadraticFit", "StudyConfig", "StudyError",
    "StudyResult", "TilePlan", "estimate_component", "estimate_model", "fit_quadratic", "parse_budget", "parse_gpu",
    "plan_tiles", "run_study", "tile_need_bytes", "write_outputs",
]
