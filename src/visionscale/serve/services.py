"""What the service runs: an anomaly model (a run folder, or a deployment bundle) and faces.

The HTTP layer talks to two small interfaces, so another backend plugs in with a few lines:

* :class:`AnomalyService`: ``score(paths) -> list[dict | Exception]``, one entry per image file,
  each dict with ``score``, ``normalized_score``, ``label``, ``anomaly_map`` ((h, w) float32
  covering the whole image), ``regions`` (boxes in image pixels, as ``ad predict``'s
  ``<name>_regions.json``) and ``image_size`` ((H, W) of the file); plus ``pixel_threshold`` and
  ``pixel_span`` for drawing, and ``info``. :class:`RunAnomalyService` serves a run folder
  with the very code ``ad predict`` scores with (:func:`~visionscale.anomaly.tiles.score_images`
  on the uploaded file), so its scores, labels and regions equal ``ad predict``'s on the same
  file; :class:`BundleAnomalyService` adapts ``visionscale.bundle.load_bundle(path)`` (a
  predictor with ``predict(list of RGB arrays) -> list[dict]`` with those keys).
* :class:`FaceService`: detect / identify / verify / enroll with
  :class:`~visionscale.face.api.FaceRecognizer` (dlib's descriptor by default), or a face
  bundle's :class:`~visionscale.bundle.face.FacePredictor` (the same methods and results, no
  torch), and an optional :class:`~visionscale.face.gallery.Gallery`.

Services are built and called in their model's worker thread only (see
:mod:`visionscale.serve.batching`): SQLite connections must stay in the thread that opened them.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from visionscale.errors import InvalidValueError, MissingDependencyError, VisionscaleError
from visionscale.serve.errors import ApiError

__all__ = ["AnomalyService", "RunAnomalyService", "BundleAnomalyService", "FaceService", "load_anomaly_service",
           "is_bundle", "bundle_kind", "overlay_png", "map_png", "HEATMAP_MAX_SIDE"]

HEATMAP_MAX_SIDE = 1024  # px: the overlay's longer side at most, as ad predict's heatmaps


class AnomalyService(Protocol):
    kind: str
    pixel_threshold: float
    pixel_span: float

    @property
    def info(self) -> dict: ...

    def score(self, paths: Sequence[Path]) -> list[dict | Exception]: ...


def is_bundle(path: str | os.PathLike) -> bool:
    """A deployment bundle, as opposed to a run folder: a folder holding ``bundle.json``, or a
    ``.tar`` / ``.zip`` archive of one (``export --bundle OUT --archive tar|zip``)."""
    return bundle_kind(path) is not None


def bundle_kind(path: str | os.PathLike) -> str | None:
    """``"anomaly"`` or ``"face"`` for a bundle folder or archive (its ``bundle.json``), None for
    anything else."""
    p = Path(path)
    if (p / "bundle.json").is_file():
        from visionscale.bundle.format import read_manifest

        return read_manifest(p)["kind"]
    if p.is_file():
        from visionscale.bundle.format import archive_manifest

        doc = archive_manifest(p)
        return doc["kind"] if doc is not None else None
    return None


def load_anomaly_service(path: str | os.PathLike, device: str = "cpu", backend: str = "eager",
                         precision: str = "fp32") -> AnomalyService:
    """A bundle folder through :class:`BundleAnomalyService`, else a run folder."""
    if is_bundle(path):
        return BundleAnomalyService(path)
    return RunAnomalyService(path, device=device, backend=backend, precision=precision)


def _clean(message: str, path: Path) -> str:
    """Error text about a spooled upload, without the server's temporary path."""
    return message.replace(str(path), "the uploaded image")


class RunAnomalyService:
    """A fitted run folder (:func:`visionscale.anomaly.runs.load_run`), scored as ``ad predict`` does."""

    kind = "run"

    def __init__(self, path: str | os.PathLike, device: str = "cpu", backend: str = "eager", precision: str = "fp32"):
        from visionscale.anomaly.runs import load_run

        self.run = load_run(path, device, backend=backend, precision=precision)
        cal = self.run.calibration
        self.image_threshold = float(cal["image_threshold"])
        self.image_span = float(cal["image_span"])
        self.pixel_threshold = float(cal["pixel_threshold"])
        self.pixel_span = float(cal["pixel_span"])

    @property
    def info(self) -> dict:
        c = self.run.config
        tiling = self.run.tiling
        return {"source": "run", "path": str(self.run.path), "model": c["model"], "method": c.get("method"),
                "image_size": list(self.run.image_size), "tiling": tiling.as_dict() if tiling else None,
                "image_threshold": self.image_threshold, "pixel_threshold": self.pixel_threshold,
                "device": str(self.run.device)}

    def score(self, paths: Sequence[Path]) -> list[dict | Exception]:
        from visionscale.anomaly.data import ReadLog, Sample
        from visionscale.anomaly.tiles import score_images
        from visionscale.io.images import ImageReadError

        paths = [Path(p) for p in paths]
        log = ReadLog()
        try:
            got = {r.sample.path: r for r in score_images(
                self.run.model, [Sample(p, -1, "") for p in paths], self.run.device, image_size=self.run.image_size,
                tiling=self.run.tiling, batch_size=len(paths), skip_bad=True, log=log, keep_maps=True)}
        except VisionscaleError as exc:
            if len(paths) > 1:  # one image spoilt the batch (a per-position grid mismatch...): one by one
                return [r for p in paths for r in self.score([p])]
            exc.args = (_clean(str(exc), paths[0]),)
            return [exc]
        bad = {Path(p): reason for p, reason in log.bad}
        out: list[dict | Exception] = []
        for p in paths:
            r = got.get(p)
            if r is None:
                out.append(ImageReadError(f"cannot read the uploaded image: "
                                          f"{_clean(bad.get(p, 'unreadable'), p)}").about("file"))
                continue
            out.append(self._record(r.score, r.amap, r.image_size))
        return out

    def _record(self, score: float, amap: np.ndarray, image_size) -> dict:
        from visionscale.anomaly.predict import normalize
        from visionscale.anomaly.regions import defect_regions

        size = tuple(int(v) for v in image_size)
        return {"score": float(score),
                "normalized_score": float(normalize(score, self.image_threshold, self.image_span)),
                "label": "anomalous" if score >= self.image_threshold else "normal",
                "anomaly_map": amap, "image_size": size,
                "regions": defect_regions(amap, self.pixel_threshold, image_size=size)}


class BundleAnomalyService:
    """A deployment bundle (``bundle.json`` in the folder) through ``visionscale.bundle.load_bundle``.

    The predictor's ``predict(list of (H, W, 3) uint8 arrays)`` gives dicts with the keys of
    :class:`AnomalyService`'s records; its thresholds are read from ``pixel_threshold`` /
    ``pixel_span`` attributes or a ``calibration`` dict, for drawing only.
    """

    kind = "bundle"

    def __init__(self, path: str | os.PathLike):
        try:
            from visionscale.bundle import load_bundle
        except ImportError as exc:
            raise MissingDependencyError(f"{path} is a deployment bundle, but visionscale.bundle cannot be imported "
                                         f"({exc})").about("target") from None
        self.path = Path(path)
        self.predictor = load_bundle(path)
        cal = getattr(self.predictor, "calibration", None) or {}
        self.pixel_threshold = float(getattr(self.predictor, "pixel_threshold", cal.get("pixel_threshold", 0.5)))
        self.pixel_span = float(getattr(self.predictor, "pixel_span", cal.get("pixel_span", 1.0)))

    @property
    def info(self) -> dict:
        extra = getattr(self.predictor, "info", None)
        return {"source": "bundle", "path": str(self.path), **(extra if isinstance(extra, dict) else {})}

    def score(self, paths: Sequence[Path]) -> list[dict | Exception]:
        from visionscale.io.images import ImageReadError, read_image

        arrays, slots, out = [], [], []
        for p in paths:
            try:
                arrays.append(read_image(p))
                slots.append(len(out))
                out.append(None)
            except ImageReadError as exc:
                out.append(ImageReadError(_clean(str(exc), Path(p))).about("file"))
        if arrays:
            for i, rec, a in zip(slots, self.predictor.predict(arrays), arrays):
                rec = dict(rec)
                rec.setdefault("image_size", a.shape[:2])
                if "regions" not in rec:
                    from visionscale.anomaly.regions import defect_regions

                    rec["regions"] = defect_regions(rec["anomaly_map"], self.pixel_threshold,
                                                    image_size=tuple(rec["image_size"]))
                out[i] = rec
        return out


# -- drawing -------------------------------------------------------------------------------

def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _resize_map(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    h, w = size
    if amap.shape == (h, w):
        return amap.astype(np.float32, copy=False)
    return np.asarray(Image.fromarray(amap.astype(np.float32), mode="F").resize((w, h), Image.Resampling.BILINEAR))


def overlay_png(path: Path, amap: np.ndarray, pixel_threshold: float, pixel_span: float) -> bytes:
    """The heatmap over the image, at most 1024 px, coloured as ``ad predict``'s ``<name>_heatmap.png``
    (blue = lowest normal value, green = the pixel threshold, red = far above, white outline)."""
    from visionscale.anomaly.plots import heatmap_overlay
    from visionscale.io.images import read_image

    image = read_image(path, max_side=HEATMAP_MAX_SIDE)
    full = _resize_map(np.asarray(amap), image.shape[:2])
    half = pixel_span / 2
    return _png(heatmap_overlay(image, full, pixel_threshold - half, pixel_threshold + half, pixel_threshold))


def map_png(amap: np.ndarray, pixel_threshold: float, pixel_span: float) -> bytes:
    """The raw map as 8-bit grey at its own size: 0 = lowest normal value, 128 = the threshold."""
    a = np.clip((np.asarray(amap, dtype=np.float64) - pixel_threshold) / pixel_span + 0.5, 0, 1)
    return _png(np.round(a * 255).astype(np.uint8))


# -- faces ---------------------------------------------------------------------------------

class FaceService:
    """Faces with :class:`~visionscale.face.api.FaceRecognizer` and an optional gallery file.

    Build and call it from one thread (the face worker): the gallery's SQLite connection
    belongs to the thread that opened it, and one thread also serialises enrolments.
    """

    def __init__(self, model: str = "face_embedder_dlib", gallery: str | os.PathLike | None = None,
                 device: str = "cpu"):
        if bundle_kind(model) is not None:  # a face bundle: ONNX Runtime, no torch
            from visionscale.bundle import load_bundle

            self.recognizer = load_bundle(model)
            if getattr(self.recognizer, "kind", None) != "face":
                self.recognizer.close()
                raise InvalidValueError(f"{model} is an anomaly bundle, not a face bundle").about("face_model")
            self.source = "bundle"
        else:
            from visionscale.face.api import FaceRecognizer

            self.recognizer = FaceRecognizer(model, device=device)
            self.source = "model"
        self.model_path = str(model)
        self.gallery = None
        self.gallery_path = None
        if gallery is not None:
            from visionscale.face.gallery import Gallery

            self.gallery_path = Path(gallery)
            self.gallery = Gallery(gallery, embedder=self.recognizer, model_source=str(model))

    @property
    def info(self) -> dict:
        r = self.recognizer
        return {"model": r.model_id, "dim": r.dim, "threshold": r.threshold, "metric": r.metric,
                "source": self.source, **({"path": self.model_path} if self.source == "bundle" else {}),
                "gallery": str(self.gallery_path) if self.gallery_path else None}

    def close(self) -> None:
        if self.gallery is not None:
            self.gallery.close()
        if hasattr(self.recognizer, "close"):
            self.recognizer.close()

    @staticmethod
    def _read(paths: Sequence[Path]) -> tuple[list[np.ndarray | None], list[Exception | None]]:
        from visionscale.io.images import ImageReadError, read_image

        arrays, errors = [], []
        for p in paths:
            try:
                arrays.append(read_image(p))
                errors.append(None)
            except ImageReadError as exc:
                arrays.append(None)
                errors.append(ImageReadError(_clean(str(exc), Path(p))).about("file"))
        return arrays, errors

    def _need_gallery(self):
        if self.gallery is None:
            raise ApiError(404, "no_gallery", "this server has no gallery (start it with --gallery DB)", "gallery")
        return self.gallery

    def detect(self, paths: Sequence[Path]) -> list[dict | Exception]:
        """Every face of each image (largest first): box, score, landmarks, usable."""
        arrays, errors = self._read(paths)
        ok = [a for a in arrays if a is not None]
        found = iter(self.recognizer.find_faces(ok) if ok else [])
        out = []
        for a, e in zip(arrays, errors):
            if e is not None:
                out.append(e)
            else:
                out.append({"image_size": list(a.shape[:2]), "faces": [f.to_dict() for f in next(found)]})
        return out

    def identify(self, jobs: Sequence[tuple[Path, int]]) -> list[dict | Exception]:
        """Who every face of each image is: the best gallery match within the threshold, or unknown."""
        gallery = self._need_gallery()
        arrays, errors = self._read([p for p, _ in jobs])
        ok = [a for a in arrays if a is not None]
        k = max((k for _, k in jobs), default=1)
        found = iter(self.recognizer.identify(gallery, ok, k=k) if ok else [])
        out = []
        for (_, kk), a, e in zip(jobs, arrays, errors):
            if e is not None:
                out.append(e)
                continue
            faces = []
            for ident in next(found):
                d = ident.to_dict()
                d["matches"] = d["matches"][:kk]
                d["label"] = ident.label
                faces.append(d)
            out.append({"image_size": list(a.shape[:2]), "faces": faces, "threshold": self.recognizer.threshold})
        return out

    def _embed_one(self, path: Path, field: str) -> np.ndarray:
        from visionscale.face.pipeline import NoFaceError
        from visionscale.io.images import ImageReadError, read_image

        try:
            image = read_image(path)
        except ImageReadError as exc:
            raise ImageReadError(_clean(str(exc), path)).about(field) from None
        try:
            return self.recognizer.embed([image], labels=[field])[0]
        except NoFaceError as exc:
            raise type(exc)(str(exc)).about(field) from None

    def verify(self, jobs: Sequence[tuple]) -> list[dict | Exception]:
        """``(path_a, path_b, None)``: same person in both? ``(path_a, None, name)``: is it ``name``?"""
        import warnings

        out = []
        for a, b, name in jobs:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # several faces: the largest, said in the docs
                    ea = self._embed_one(a, "image_a")
                    t = self.recognizer.threshold
                    if name is None:
                        eb = self._embed_one(b, "image_b")
                        d = float(np.linalg.norm(ea.astype(np.float64) - eb.astype(np.float64)))
                        out.append({"distance": d, "same": d < t, "threshold": t, "model": self.recognizer.model_id})
                        continue
                    g = self._need_gallery()
                    if name not in g:
                        raise ApiError(404, "unknown_identity", f"no person named {name!r} in the gallery", "name")
                    d = g.distance(name, ea)  # as the gallery compares: to the closest sample
                    out.append({"distance": d, "same": d < t, "threshold": t, "name": name,
                                "model": self.recognizer.model_id})
            except Exception as exc:  # noqa: BLE001 - answered per request (mapped to 4xx by type)
                out.append(exc)
        return out

    def enroll(self, jobs: Sequence[tuple]) -> list[dict | Exception]:
        """``(name, paths, if_exists, filenames)``: add the largest face of each image to ``name``.

        ``if_exists="append"`` adds to a person already enrolled (two concurrent enrolments
        of one name both land, one after the other: nothing is lost); ``"fail"`` refuses
        with 409 when the name exists. Each enrolment is one transaction.
        """
        import warnings

        out = []
        for name, paths, if_exists, filenames in jobs:
            try:
                g = self._need_gallery()
                if not isinstance(name, str) or not name.strip() or name != name.strip():
                    raise ApiError(422, "invalid_name", f"a person's name must be a non-empty string without "
                                                        f"leading or trailing spaces, got {name!r}", "name")
                if if_exists not in ("append", "fail"):
                    raise InvalidValueError(f"if_exists must be append or fail, got {if_exists!r}").about("if_exists")
                if if_exists == "fail" and name in g:
                    raise ApiError(409, "already_enrolled", f"{name!r} is already enrolled (if_exists=append adds "
                                                            f"to it)", "name")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    vecs = np.stack([self._embed_one(p, "file") for p in paths])
                try:
                    added = g.enroll(name, embeddings=vecs, sources=[f"upload:{f}" for f in filenames])
                except VisionscaleError as exc:
                    if str(exc).startswith("a person's name"):  # the gallery's own name rules
                        raise ApiError(422, "invalid_name", str(exc), "name") from None
                    raise
                total = len(g.embeddings_of(name))
                out.append({"name": name, "added": added, "embeddings": total, "people": len(g)})
            except Exception as exc:  # noqa: BLE001 - answered per request
                out.append(exc)
        return out

    def people(self, _jobs: Sequence = (None,)) -> list[dict | Exception]:
        try:
            g = self._need_gallery()
            rows = [{"name": p.name, "embeddings": p.n_embeddings, "created": p.created} for p in g.list()]
            return [{"people": rows}] * len(_jobs)
        except Exception as exc:  # noqa: BLE001
            return [exc] * len(_jobs)

    def remove(self, names: Sequence[str]) -> list[dict | Exception]:
        out = []
        for name in names:
            try:
                g = self._need_gallery()
                if name not in g:
                    raise ApiError(404, "unknown_identity", f"no person named {name!r} in the gallery", "name")
                out.append({"name": name, "removed_embeddings": g.remove(name)})
            except Exception as exc:  # noqa: BLE001
                out.append(exc)
        return out
