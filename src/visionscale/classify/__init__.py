"""Image classification on registry backbones and CNN inspection (seed 004).

* :mod:`~visionscale.classify.model`: :class:`Classifier` (pure torch: backbone + linear head).
* :mod:`~visionscale.classify.data`: image-folder layout, seeded split, affine augmentation.
* :mod:`~visionscale.classify.train`: transfer learning, early stopping, checkpoints, eval, predict.
* :mod:`~visionscale.classify.metrics` / :mod:`~visionscale.classify.plots`: metrics and figures.
* :mod:`~visionscale.classify.inspect`: layer table, filter and feature-map grids for any model.
* :mod:`~visionscale.classify.convarith`: output sizes and receptive fields.
* :mod:`~visionscale.classify.demo`: the offline texture demo data set.

Submodules are imported on demand; importing this package pulls in nothing heavy.
"""
