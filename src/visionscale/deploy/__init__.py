"""Deploying any model visionscale makes: the layer above the domains.

``runtime/`` (Runner, backends, precision, export) runs an ``nn.Module`` and knows nothing of
anomaly detection, faces, classifiers or detectors. What has to know all of them to get a
trained model ready to ship lives here, above ``anomaly/``, ``classify/``, ``detection/`` and
``face/``, hence the name:

* :mod:`visionscale.deploy.checkpoints`: which model a path is (an ``ad fit`` run folder, a
  classifier, detector or face-embedder checkpoint) and how it loads; registered with
  :func:`visionscale.registry.register_loader`, so ``Runner("runs/x")`` and ``visionscale
  export runs/x`` load it without the runtime importing a domain;
* :mod:`visionscale.deploy.bench`: ``visionscale bench``, latency and outputs per backend x
  precision x batch;
* :mod:`visionscale.deploy.tasks`: the metric a user reports (AUROC, accuracy, AP,
  verification accuracy) per backend, for ``bench --data``.

Imports point down only: deploy -> domains -> runtime -> torch.
"""

from __future__ import annotations

_LAZY = {
    "bench": "visionscale.deploy.bench",
    "BenchConfig": "visionscale.deploy.bench",
    "BenchResult": "visionscale.deploy.bench",
    "render_markdown": "visionscale.deploy.bench",
    "write_result": "visionscale.deploy.bench",
    "TaskMetric": "visionscale.deploy.tasks",
    "task_metric": "visionscale.deploy.tasks",
    "load_checkpoint": "visionscale.deploy.checkpoints",
}


def __getattr__(name: str):  # lazy: bench and the domains import heavy packages
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = list(_LAZY)
