"""The main job: how memory and runtime grow with image resolution, and what fits on a GPU.

>>> from visionscale.study import StudyConfig, run_study, write_outputs
>>> result = run_study(StudyConfig(models=("efficientad_s",), resolutions=(256, 512, 1024)))
"""

from visionscale.study.fit import QuadraticFit, fit_quadratic
from visionscale.study.gpus import GPU, GPUS, parse_gpu
from visionscale.study.memory import MemoryEstimate, estimate_component, estimate_model
from visionscale.study.report import write_outputs
from visionscale.study.sweep import StudyConfig, StudyError, StudyResult, run_study

__all__ = [
    "GPU", "GPUS", "MemoryEstimate", "QuadraticFit", "StudyConfig", "StudyError", "StudyResult",
    "estimate_component", "estimate_model", "fit_quadratic", "parse_gpu", "run_study", "write_outputs",
]
