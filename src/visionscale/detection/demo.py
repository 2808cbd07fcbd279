"""A face-detection dataset made offline from images that scikit-image ships.

Faces: the 100 face crops of ``skimage.data.lfw_subset()`` (Labeled Faces in the Wild,
25x25 grey) and the astronaut's face (``skimage.data.astronaut()``). Distractors that must
*not* be detected: the 100 non-face crops of ``lfw_subset`` and patches of the cat,
coffee, coins and rocket images. Both are pasted at log-uniform sizes and aspect ratios
(h / w in [0.7, 1.5]), tinted with the same random colours (so colour is no cue), onto
crops of scikit-image's texture and photo images. Labels are COCO JSON (one category,
"face"). Train and validation use disjoint LFW identities.

Layout written by :func:`make_demo`: ``OUT/images/*.png``, ``OUT/train.json``,
``OUT/val.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from visionscale.errors import InvalidValueError, check_finite, check_int

__all__ = ["DemoConfig", "DEMO_KIND", "make_demo"]

DEMO_KIND = "detect-demo"  # manifest kind of the folder
MAX_DEMO_SIZE = 2048

# Astronaut's face in skimage.data.astronaut() (512x512), x1, y1, x2, y2: forehead to chin.
_ASTRONAUT_FACE = (168, 58, 276, 184)


@dataclass(frozen=True)
class DemoConfig:
    """Size and content of the demo set.

    Attributes:
        n_train, n_val: Images per split.
        size: Side of the square images in pixels.
        faces: (min, max) faces per image.
        distractors: (min, max) non-face patches per image.
        min_side: Smallest pasted side in pixels; the largest is ``max_frac * size``.
        max_frac: Largest pasted side as a fraction of ``size``.
        seed: Everything is drawn from this seed.
    """

    n_train: int = 600
    n_val: int = 150
    size: int = 160
    faces: tuple[int, int] = (1, 4)
    distractors: tuple[int, int] = (1, 3)
    min_side: int = 10
    max_frac: float = 0.7
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("n_train", self.n_train, minimum=1, maximum=1_000_000)
        check_int("n_val", self.n_val, minimum=1, maximum=1_000_000)
        check_int("size", self.size, minimum=32, maximum=MAX_DEMO_SIZE)
        check_int("seed", self.seed, minimum=0)
        for name in ("faces", "distractors"):
            lo_hi = getattr(self, name)
            if (len(lo_hi) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in lo_hi)
                    or not 0 <= lo_hi[0] <= lo_hi[1] <= 100):
                raise InvalidValueError(f"{name} must be (min, max) with 0 <= min <= max <= 100, got {lo_hi!r}")
        check_finite("max_frac", self.max_frac, minimum=0.0, maximum=1.0, min_inclusive=False)
        check_int("min_side", self.min_side, minimum=4)
        if not self.min_side < self.max_frac * self.size:
            raise InvalidValueError(f"min_side must be below max_frac * size, got {self.min_side}")


def _sources():
    """Face crops (train, val), distractor crops, backgrounds; all float RGB in [0, 1]."""
    from skimage import data

    lfw = data.lfw_subset()  # (200, 25, 25) float in [0, 1]; first 100 faces, then 100 non-faces
    rgb = lambda g: np.repeat(g[..., None], 3, axis=2)  # noqa: E731
    faces = [rgb(f) for f in lfw[:100]]
    x1, y1, x2, y2 = _ASTRONAUT_FACE
    astro = data.astronaut()[y1:y2, x1:x2].astype(np.float32) / 255
    train_faces, val_faces = faces[:80] + [astro], faces[80:]

    others = [rgb(f) for f in lfw[100:]]
    chelsea = data.chelsea().astype(np.float32) / 255
    coffee = data.coffee().astype(np.float32) / 255
    rocket = data.rocket().astype(np.float32) / 255
    coins = data.coins().astype(np.float32) / 255
    others += [chelsea[40:200, 110:300], chelsea[0:150, 250:451], coffee[50:350, 100:450], coffee[0:200, 350:600],
               rocket[100:420, 250:420], rgb(coins[0:150, 0:200]), rgb(coins[150:303, 150:384])]

    def gray(a):
        return rgb(a.astype(np.float32) / 255)

    backgrounds = [gray(data.brick()), gray(data.grass()), gray(data.gravel()), gray(data.moon()),
                   gray(data.page()), gray(data.text()), coffee, rocket, chelsea,
                   data.hubble_deep_field().astype(np.float32) / 255,
                   data.immunohistochemistry().astype(np.float32) / 255]
    return train_faces, val_faces, others, backgrounds


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    from PIL import Image

    u8 = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(u8).resize((w, h), Image.BILINEAR), dtype=np.float32) / 255


def _tint(patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # same photometric jitter for faces and distractors: grey level, colour cast, contrast
    colour = rng.uniform(0.6, 1.2, size=3)
    contrast = rng.uniform(0.7, 1.3)
    m = patch.mean()
    return np.clip((patch - m) * contrast + m, 0, 1) * colour


def _background(backgrounds: list[np.ndarray], size: int, rng: np.random.Generator) -> np.ndarray:
    bg = backgrounds[rng.integers(len(backgrounds))]
    h, w = bg.shape[:2]
    side = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    out = _resize(bg[y:y + side, x:x + side], size, size)
    return np.clip(out * rng.uniform(0.6, 1.2) + rng.uniform(-0.1, 0.1), 0, 1)


def _place(boxes: list[tuple[int, int, int, int]], w: int, h: int, size: int, rng: np.random.Generator):
    """A free position for a w x h patch (little overlap with earlier ones), or None."""
    for _ in range(30):
        x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
        ok = True
        for bx1, by1, bx2, by2 in boxes:
            iw = max(0, min(x + w, bx2) - max(x, bx1))
            ih = max(0, min(y + h, by2) - max(y, by1))
            if iw * ih > 0.1 * min(w * h, (bx2 - bx1) * (by2 - by1)):
                ok = False
                break
        if ok:
            return x, y
    return None


def _render(cfg: DemoConfig, faces, others, backgrounds, rng) -> tuple[np.ndarray, list[list[float]]]:
    img = _background(backgrounds, cfg.size, rng)
    placed: list[tuple[int, int, int, int]] = []
    labels: list[list[float]] = []
    n_faces = int(rng.integers(cfg.faces[0], cfg.faces[1] + 1))
    n_other = int(rng.integers(cfg.distractors[0], cfg.distractors[1] + 1))
    kinds = [True] * n_faces + [False] * n_other
    rng.shuffle(kinds)
    lo, hi = math.log(cfg.min_side), math.log(cfg.max_frac * cfg.size)
    for is_face in kinds:
        src = (faces if is_face else others)[rng.integers(len(faces if is_face else others))]
        side = math.exp(rng.uniform(lo, hi))
        ratio = math.exp(rng.uniform(math.log(0.7), math.log(1.5)))  # h / w
        w = max(4, min(cfg.size, round(side / math.sqrt(ratio))))
        h = max(4, min(cfg.size, round(side * math.sqrt(ratio))))
        pos = _place(placed, w, h, cfg.size, rng)
        if pos is None:
            continue
        x, y = pos
        patch = _tint(_resize(src, w, h), rng)
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        img[y:y + h, x:x + w] = patch
        placed.append((x, y, x + w, y + h))
        if is_face:
            labels.append([float(x), float(y), float(w), float(h)])
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), labels


def make_demo(out_dir: str | Path, config: DemoConfig | None = None, progress=None, overwrite: bool = False) -> dict:
    """Write the demo set to ``out_dir`` and return a summary.

    The folder appears complete or not at all (:class:`~visionscale.io.outputs.OutputDir`): a
    new or empty folder, or an earlier demo (which is replaced), is fine; a folder holding
    files the demo did not write is refused before any work unless ``overwrite`` (those files
    then stay).

    Args:
        out_dir: The folder.
        config: Sizes and seed.
        progress: Optional callable ``(done, total)``.
        overwrite: Write into a folder that holds other files.

    Returns:
        ``{"train": path, "val": path, "images": n, "faces": n, ...}``.
    """
    from visionscale.io.outputs import OutputDir

    cfg = config or DemoConfig()
    out = Path(out_dir)
    with OutputDir(out, kind=DEMO_KIND, overwrite=overwrite) as tmp:
        summary = _write_demo(tmp, cfg, progress)
    return {k: (str(out / Path(v).name) if k in ("train", "val") else v) for k, v in summary.items()}


def _write_demo(out: Path, cfg: DemoConfig, progress) -> dict:
    from PIL import Image

    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    train_faces, val_faces, others, backgrounds = _sources()
    summary = {"size": cfg.size, "seed": cfg.seed}
    total, done = cfg.n_train + cfg.n_val, 0
    for split, n, faces in (("train", cfg.n_train, train_faces), ("val", cfg.n_val, val_faces)):
        images, anns = [], []
        for i in range(n):
            img, boxes = _render(cfg, faces, others, backgrounds, rng)
            name = f"{split}_{i:05d}.png"
            Image.fromarray(img).save(out / "images" / name, format="PNG")
            images.append({"id": i + 1, "file_name": f"images/{name}", "width": cfg.size, "height": cfg.size})
            for x, y, w, h in boxes:
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1, "bbox": [x, y, w, h],
                             "area": w * h, "iscrowd": 0})
            done += 1
            if progress is not None:
                progress(done, total)
        doc = {"info": {"description": f"visionscale demo faces ({split})", "config": asdict(cfg)},
               "images": images, "annotations": anns, "categories": [{"id": 1, "name": "face"}]}
        (out / f"{split}.json").write_text(json.dumps(doc))
        summary[split] = str(out / f"{split}.json")
        summary[f"{split}_images"] = n
        summary[f"{split}_faces"] = len(anns)
    return summary
