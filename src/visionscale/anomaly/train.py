"""``ad fit``'s front door: :func:`fit` picks the method's fitting for ``config.model``.

Where fitting lives (one way: each module imports only those below it)::

    train.py            fit(): dispatch by method (this module)
    patchcore_fit.py    fit_patchcore       features -> coreset -> calibration
    efficientad_fit.py  fit_efficientad     teacher -> statistics -> training -> map normalisation -> calibration
    ddad_fit.py         fit_ddad_run        training (ddad_train) -> calibration
    run.py              FitRun: the run folder (lock, resume checks, state, finish)
    calibration.py      thresholds, normalisation and test metrics
    runs.py             loading a fitted run (predict imports this, never fitting)
    config.py           FitConfig, FitError, FitResult, the model names

``FitConfig``, ``FitError``, ``FitResult``, the model name tuples, :func:`fit_patchcore`,
:func:`fit_efficientad` and :func:`fit_ddad_run` are re-exported here, their old place.
Other names that used to live here (``build_run_model``, ``SignedInput``, ``build_model``,
``fit_memory_estimate``, ...) still resolve, with a :class:`DeprecationWarning` naming
their new module.
"""

from __future__ import annotations

import os

from visionscale._deprecated import moved
from visionscale.anomaly.config import (
    DDAD_MODELS,
    EFFICIENTAD_MODELS,
    FIT_MODELS,
    PATCHCORE_MODELS,
    FitConfig,
    FitError,
    FitResult,
    Log,
    Progress,
    method_of,
)
from visionscale.anomaly.ddad_fit import fit_ddad_run
from visionscale.anomaly.efficientad_fit import fit_efficientad
from visionscale.anomaly.patchcore_fit import fit_patchcore

__all__ = [
    "PATCHCORE_MODELS",
    "EFFICIENTAD_MODELS",
    "DDAD_MODELS",
    "FIT_MODELS",
    "method_of",
    "FitConfig",
    "FitError",
    "FitResult",
    "fit",
    "fit_patchcore",
    "fit_efficientad",
    "fit_ddad_run",
]


def fit(
    data: str | os.PathLike,
    out: str | os.PathLike,
    config: FitConfig | None = None,
    *,
    category: str | None = None,
    progress: Progress | None = None,
    log: Log | None = None,
    keep_cache: bool = False,
    overwrite: bool = False,
) -> FitResult:
    """Fit ``config.model`` on the normal training images under ``data`` into the run folder ``out``.

    Dispatches to :func:`fit_patchcore`, :func:`fit_efficientad` or :func:`fit_ddad_run`; every
    method writes the same run folder (``config.json``, ``versions.json``,
    ``model.safetensors``, ``calibration.json``, ``metrics.json``, ``state.json``) that
    :func:`visionscale.anomaly.runs.load_run` reads back.

    The run folder is locked for the whole fit (:class:`~visionscale.io.outputs.RunLock`: a
    second fit into it fails at once). A folder that holds anything but a run is refused
    unless ``overwrite`` (then a run's file names there are replaced; with ``overwrite`` a
    different fit there is started over). A fit that fails before it saved anything it could
    resume from leaves no new folder behind.
    """
    cfg = config or FitConfig()
    if cfg.memory_budget is not None and cfg.tile is None:
        cfg = _budget_tile(cfg, data, category)
    # Looked up in this module at call time, so a replaced fit_patchcore (tests) is the one called.
    if cfg.method == "patchcore":
        return fit_patchcore(data, out, cfg, category=category, progress=progress, log=log, keep_cache=keep_cache,
                             overwrite=overwrite)
    if cfg.method == "efficientad":
        return fit_efficientad(data, out, cfg, category=category, progress=progress, log=log, overwrite=overwrite)
    return fit_ddad_run(data, out, cfg, category=category, progress=progress, log=log, overwrite=overwrite)


def _budget_tile(cfg: FitConfig, data, category: str | None) -> FitConfig:
    """``tile`` from ``memory_budget``, next to the largest training image (its header size)."""
    from visionscale.anomaly.data import image_size_of, load_dataset
    from visionscale.anomaly.tiles import choose_fit_tile

    if cfg.pre_resize is not None:
        largest = cfg.pre_resize
    else:
        ds = load_dataset(data, category, seed=cfg.seed, check_masks=False)
        sizes = [sz for sz in (image_size_of(s.path) for s in ds.train + ds.test) if sz is not None]
        largest = max(sizes, key=lambda hw: hw[0] * hw[1]) if sizes else None
    return choose_fit_tile(cfg, largest)


# Names that moved out of this module: old name -> "module:name there".
_MOVED = {
    "build_run_model": "visionscale.anomaly.runs:build_run_model",
    "build_model": "visionscale.anomaly.runs:build_patchcore",
    "SignedInput": "visionscale.anomaly.runs:SignedInput",
    "imagenet_to_signed": "visionscale.anomaly.runs:imagenet_to_signed",
    "fit_memory_estimate": "visionscale.anomaly.patchcore_fit:fit_memory_estimate",
    "peak_rss_bytes": "visionscale.anomaly.run:peak_rss_bytes",
    "RUN_FILES": "visionscale.anomaly.run:RUN_FILES",
    "RUN_FOLDERS": "visionscale.anomaly.run:RUN_FOLDERS",
    "RANDOM_WEIGHTS_WARNING": "visionscale.anomaly.config:RANDOM_WEIGHTS_WARNING",
    "RANDOM_TEACHER_WARNING": "visionscale.anomaly.config:RANDOM_TEACHER_WARNING",
    "MAX_IMAGE_SIDE": "visionscale.anomaly.config:MAX_IMAGE_SIDE",
}


__getattr__ = moved(__name__, _MOVED)
