"""Image-folder data for classification: layout checks, a seeded split, loading, augmentation.

Layout (as torchvision's ``ImageFolder`` and Keras' ``flow_from_directory``)::

    DATA_DIR/
      cat/  001.jpg 002.png ...
      dog/  ...

Class names are the sub-folder names, sorted; the class index is the position in that
list. Images are decoded once with :func:`visionscale.io.images.read_image`, resized so
the shorter side is ``image_size``, centre-cropped to a square and kept in memory as
uint8 (``3 * image_size**2`` bytes each). A large file is first shrunk by a whole factor
while still 8-bit (``read_image(min_size=...)``), so a 12000 px photo never becomes a
full-size float array. A file that cannot be read stops the run
before training starts, with its path in the message.

Augmentation (seed 004: "rotation, zoom, shift, shear, flip") is one random affine
transform per image, applied to a whole batch at once with ``affine_grid`` /
``grid_sample``: no torchvision, and the same code runs on GPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from visionscale.errors import VisionscaleError, check_finite
from visionscale.io.images import IMAGE_SUFFIXES, list_images, read_image
# ImageNet statistics: what the registry's pretrained ResNets expect; also used for training
# from scratch so a checkpoint always records one explicit normalisation.
from visionscale.modelinfo import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "DataError",
    "ImageFolderSamples",
    "scan_image_folder",
    "split_samples",
    "load_image",
    "load_images",
    "normalize",
    "AugmentConfig",
    "affine_theta",
    "augment_batch",
]

class DataError(VisionscaleError, ValueError):
    """The data folder does not have the expected layout or content."""


@dataclass
class ImageFolderSamples:
    """Files of an image-folder dataset.

    Attributes:
        root: The folder that holds one sub-folder per class.
        classes: Class names (sub-folder names), sorted.
        paths: Image files.
        labels: Class index per file.
    """

    root: Path
    classes: list[str]
    paths: list[Path]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.paths)

    def counts(self) -> dict[str, int]:
        c = np.bincount(np.asarray(self.labels, dtype=np.int64), minlength=len(self.classes))
        return {name: int(n) for name, n in zip(self.classes, c)}

    def subset(self, idx: Sequence[int]) -> ImageFolderSamples:
        return ImageFolderSamples(self.root, self.classes, [self.paths[i] for i in idx], [self.labels[i] for i in idx])


def scan_image_folder(root: str | os.PathLike, classes: Sequence[str] | None = None, min_classes: int = 2) -> ImageFolderSamples:
    """List a ``root/<class>/<image>`` folder and check it is usable.

    Args:
        root: Folder with one sub-folder per class.
        classes: The classes a trained model knows. When given, every sub-folder must be
            one of them (a validation or test folder may lack some), and labels index
            into this list rather than into the folder's own sorted names.
        min_classes: Fewest class folders accepted (2 for training; 1 for evaluation).

    Raises:
        DataError: Missing folder, no class folders, a class folder without images, fewer
            than ``min_classes`` classes, or a folder name the model does not know.
    """
    base = Path(root).expanduser()
    if not base.exists():
        raise DataError(f"data folder not found: {base}")
    if not base.is_dir():
        raise DataError(f"data path is a file, expected a folder with one sub-folder per class: {base}")
    folders = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        loose = list_images(base)
        hint = f" ({len(loose)} images lie directly in it; move them into one sub-folder per class)" if loose else ""
        raise DataError(f"no class folders in {base}: expected {base}/<class name>/<images>{hint}")
    names = [p.name for p in folders]
    if classes is not None:
        unknown = [n for n in names if n not in classes]
        if unknown:
            raise DataError(f"class folder(s) {', '.join(unknown)} in {base} are not classes of the model "
                            f"(it knows: {', '.join(classes)})")
        index = {n: classes.index(n) for n in names}
        out_classes = list(classes)
    else:
        index = {n: i for i, n in enumerate(names)}
        out_classes = names
    paths: list[Path] = []
    labels: list[int] = []
    for folder in folders:
        files = list_images(folder)
        if not files:
            sub = [p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
            hint = (f"; it has sub-folders ({', '.join(sorted(sub)[:5])}): is {base} a folder of splits? "
                    f"then pass {folder} or its sibling split as DATA_DIR") if sub else ""
            raise DataError(f"class folder {folder} has no images (looked for {', '.join(IMAGE_SUFFIXES)}){hint}")
        paths += files
        labels += [index[folder.name]] * len(files)
    if len(folders) < min_classes:
        raise DataError(f"need at least {min_classes} classes to train a classifier, found {len(folders)} "
                        f"({', '.join(names)}) in {base}")
    return ImageFolderSamples(base, out_classes, paths, labels)


def split_samples(samples: ImageFolderSamples, val_fraction: float, seed: int) -> tuple[ImageFolderSamples, ImageFolderSamples]:
    """Stratified, seeded train/validation split: every class lands in both parts.

    Each class keeps ``round(n * val_fraction)`` images for validation, at least one,
    and at least one for training. The same seed gives the same split on any machine
    (numpy's PCG64 on sorted file lists).

    Raises:
        DataError: ``val_fraction`` outside (0, 1) or a class with fewer than 2 images.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"validation fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(samples.labels)
    train_idx: list[int] = []
    val_idx: list[int] = []
    for c, name in enumerate(samples.classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) == 0:
            continue
        if len(idx) < 2:
            raise DataError(f"class {name!r} has {len(idx)} image; a validation split needs at least 2 per class "
                            f"(add images or pass a separate validation folder)")
        idx = rng.permutation(idx)
        n_val = min(max(1, round(len(idx) * val_fraction)), len(idx) - 1)
        val_idx += idx[:n_val].tolist()
        train_idx += idx[n_val:].tolist()
    return samples.subset(sorted(train_idx)), samples.subset(sorted(val_idx))


def resize_center_crop(img: Tensor, size: int) -> Tensor:
    """``(3, H, W)`` float -> ``(3, size, size)``: shorter side to ``size`` (antialiased), centre crop."""
    _, h, w = img.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        img = F.interpolate(img[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return img[:, top : top + size, left : left + size]


def image_to_tensor(rgb: np.ndarray, size: int) -> Tensor:
    """``(H, W, 3)`` uint8 -> ``(3, size, size)`` uint8 via :func:`resize_center_crop`."""
    x = torch.from_numpy(rgb).permute(2, 0, 1).float()  # (3, H, W) in 0..255
    x = resize_center_crop(x, size)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def load_image(path: str | os.PathLike, size: int) -> Tensor:
    """One file as ``(3, size, size)`` uint8 (shorter side to ``size``, centre crop).

    Memory stays bounded by the decoded 8-bit file: ``read_image`` shrinks it by a whole
    factor to no less than ``size`` on both sides before any RGB or float copy is made.
    """
    return image_to_tensor(read_image(path, min_size=(size, size)), size)


def load_images(paths: Sequence[Path], size: int, progress: Callable[[int, int], None] | None = None) -> Tensor:
    """Decode, resize and crop every file: ``(N, 3, size, size)`` uint8.

    Raises:
        ImageReadError: A file cannot be decoded (message names it).
    """
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    for i, p in enumerate(paths):
        out[i] = load_image(p, size)
        if progress is not None:
            progress(i + 1, len(paths))
    return out


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 or 0..255 float ``(B, 3, H, W)`` -> ``(x / 255 - mean) / std`` as float32."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255.0 - m) / s


@dataclass(frozen=True)
class AugmentConfig:
    """Strengths of the random affine augmentation (all off by default).

    Each image gets its own transform, drawn uniformly within these ranges (the
    meaning follows Keras' ``ImageDataGenerator``, which the seed uses):

    Attributes:
        rotation: Max rotation in degrees, either direction.
        zoom: Scale factor drawn from ``[1 - zoom, 1 + zoom]``; > 1 magnifies.
        shift: Max translation as a fraction of width (x) and height (y), drawn per axis.
        shear: Max horizontal shear angle in degrees, either direction.
        hflip: Mirror left-right with probability 0.5.
        vflip: Mirror top-bottom with probability 0.5.
        fill: What appears where the transform looks outside the image:
            ``"border"`` (repeat edge pixels, Keras' ``"nearest"``), ``"reflection"`` or ``"zeros"``.
    """

    rotation: float = 0.0
    zoom: float = 0.0
    shift: float = 0.0
    shear: float = 0.0
    hflip: bool = False
    vflip: bool = False
    fill: str = "border"

    def __post_init__(self) -> None:
        for name, hi in (("rotation", 180.0), ("zoom", 0.95), ("shift", 1.0), ("shear", 80.0)):
            check_finite(f"augmentation {name}", getattr(self, name), minimum=0.0, maximum=hi)
        if self.fill not in ("border", "reflection", "zeros"):
            raise DataError(f"augmentation fill must be border, reflection or zeros, got {self.fill!r}")

    @property
    def active(self) -> bool:
        return bool(self.rotation or self.zoom or self.shift or self.shear or self.hflip or self.vflip)

    def to_dict(self) -> dict:
        return asdict(self)


def affine_theta(
    h: int,
    w: int,
    rotation: Tensor,
    zoom: Tensor,
    shift_x: Tensor,
    shift_y: Tensor,
    shear: Tensor,
    flip_x: Tensor,
    flip_y: Tensor,
) -> Tensor:
    """``affine_grid`` matrices ``(B, 2, 3)`` for per-image transforms of ``(H, W)`` images.

    The transform acts on the image content about its centre, in pixel units so that
    a rotation of a non-square image stays a rotation: ``p_out = T @ Rot @ Shear @ Zoom
    @ Flip @ p_in``. ``affine_grid`` needs the opposite direction (for each output pixel,
    where to sample the input), so the matrix is inverted, then converted to the
    normalised ``[-1, 1]`` coordinates it works in.

    Args:
        h, w: Image size in pixels.
        rotation: Degrees, counter-clockwise as displayed (y axis points down).
        zoom: Scale factors (> 1 magnifies).
        shift_x, shift_y: Translation as a fraction of width / height (+ = right / down).
        shear: Horizontal shear angle in degrees.
        flip_x, flip_y: Booleans, mirror left-right / top-bottom.
    """
    b = rotation.shape[0]
    dev = rotation.device
    a = torch.deg2rad(rotation.float())
    cos, sin = torch.cos(a), torch.sin(a)
    # y grows downwards, so a counter-clockwise turn on screen is [[c, s], [-s, c]].
    rot = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)  # (B, 2, 2)
    sh = torch.zeros(b, 2, 2, device=dev)
    sh[:, 0, 0] = 1.0
    sh[:, 1, 1] = 1.0
    sh[:, 0, 1] = torch.tan(torch.deg2rad(shear.float()))
    scale = torch.diag_embed(torch.stack([zoom.float() * torch.where(flip_x, -1.0, 1.0),
                                          zoom.float() * torch.where(flip_y, -1.0, 1.0)], -1))
    fwd = rot @ sh @ scale  # (B, 2, 2), pixel units about the centre
    t = torch.stack([shift_x.float() * w, shift_y.float() * h], -1)  # (B, 2) pixels
    inv = torch.linalg.inv(fwd)
    # input = inv @ (output - t); pixels -> normalised: x_n = x_p / (w / 2).
    d = torch.tensor([w / 2.0, h / 2.0], device=dev)
    theta_lin = inv * d.view(1, 1, 2) / d.view(1, 2, 1)  # D^-1 @ inv @ D
    theta_t = -(inv @ t.unsqueeze(-1)).squeeze(-1) / d
    return torch.cat([theta_lin, theta_t.unsqueeze(-1)], dim=-1)


def apply_theta(x: Tensor, theta: Tensor, fill: str = "border") -> Tensor:
    """Resample ``(B, C, H, W)`` float images with ``affine_grid`` matrices ``(B, 2, 3)``."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=fill, align_corners=False)


def augment_batch(x: Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None) -> Tensor:
    """Random affine augmentation of a float batch ``(B, C, H, W)``; identity if ``cfg`` is off.

    Random numbers come from ``generator`` (on the CPU, so runs repeat across devices).
    """
    if not cfg.active:
        return x
    b, _, h, w = x.shape

    def uniform(lo: float, hi: float) -> Tensor:
        return (lo + (hi - lo) * torch.rand(b, generator=generator)).to(x.device)

    def coin(on: bool) -> Tensor:
        return (torch.rand(b, generator=generator) < 0.5).to(x.device) if on else torch.zeros(b, dtype=torch.bool, device=x.device)

    theta = affine_theta(
        h, w,
        rotation=uniform(-cfg.rotation, cfg.rotation),
        zoom=uniform(1.0 - cfg.zoom, 1.0 + cfg.zoom),
        shift_x=uniform(-cfg.shift, cfg.shift),
        shift_y=uniform(-cfg.shift, cfg.shift),
        shear=uniform(-cfg.shear, cfg.shear),
        flip_x=coin(cfg.hflip),
        flip_y=coin(cfg.vflip),
    )
    return apply_theta(x, theta, cfg.fill)
