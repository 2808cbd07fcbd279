"""The bundle format on disk: ``bundle.json``, the graphs, ``checksums.sha256``; archives.

A bundle is a folder (or a ``.tar`` / ``.zip`` of its files, at the archive's root)::

    bundle.json          format name + version, kind, pre/post-processing, model card
    model.onnx           the graph(s) (names listed in bundle.json "graphs")
    model.onnx.json      the export report: dynamic axes, ranges, parity against eager torch
    checksums.sha256     "<sha256>  <file>" for every other file, sha256sum's format

numpy and the standard library only (no torch; onnxruntime only inside :func:`session`): reading
and checking a bundle is the same code for every kind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path

from visionscale.errors import InvalidFileError, MissingDependencyError, VisionscaleError, check_int

__all__ = ["FORMAT", "VERSION", "MANIFEST", "CHECKSUMS", "ARCHIVES", "BundleError", "BundleChecksumError",
           "sha256_file", "checksum_lines", "verify", "read_manifest", "unpack", "pack", "require", "session"]

FORMAT = "visionscale-bundle"
VERSION = 1
MANIFEST = "bundle.json"
CHECKSUMS = "checksums.sha256"
ARCHIVES = ("tar", "zip")
# Files a folder may hold that are not part of the bundle (what visionscale's staged writes leave).
_NOT_CHECKED = {CHECKSUMS, ".visionscale-output.json"}


class BundleError(VisionscaleError, ValueError):
    """A bundle cannot be written or used: missing file, wrong format or version, unsupported run."""


class BundleChecksumError(BundleError, InvalidFileError):
    """A file of a bundle does not match ``checksums.sha256`` (edited, truncated, corrupt)."""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.relative_to(folder).as_posix() not in _NOT_CHECKED)


def checksum_lines(folder: str | os.PathLike) -> str:
    """``checksums.sha256`` for every file of ``folder`` (sorted, ``sha256sum -c`` reads it)."""
    folder = Path(folder)
    return "".join(f"{sha256_file(folder / rel)}  {rel}\n" for rel in _files(folder))


def verify(folder: str | os.PathLike) -> dict[str, str]:
    """Check every file against ``checksums.sha256``; return ``{file: sha256}``.

    Raises:
        BundleError: No checksums file, or a file it lists is missing.
        BundleChecksumError: A file's sha256 differs (names the file), or a file that is not
            listed sits in the bundle (a graph dropped in by hand is refused, not run).
    """
    folder = Path(folder)
    listing = folder / CHECKSUMS
    if not listing.is_file():
        raise BundleError(f"{folder} is not a bundle: {CHECKSUMS} is missing")
    want: dict[str, str] = {}
    for n, line in enumerate(listing.read_text().splitlines(), 1):
        if not line.strip():
            continue
        digest, _, rel = line.partition("  ")
        if len(digest) != 64 or not rel or rel.startswith("/") or ".." in Path(rel).parts:
            raise BundleChecksumError(f"{listing} line {n} is not '<sha256>  <file>': {line[:80]!r}")
        want[rel] = digest.lower()
    for rel, digest in want.items():
        path = folder / rel
        if not path.is_file():
            raise BundleError(f"bundle {folder} is incomplete: {rel} is missing (listed in {CHECKSUMS})")
        got = sha256_file(path)
        if got != digest:
            raise BundleChecksumError(f"bundle file {folder / rel} does not match its checksum (sha256 {got[:16]}..., "
                                      f"expected {digest[:16]}...): the file was changed or is corrupt; copy the "
                                      f"bundle again")
    extra = [rel for rel in _files(folder) if rel not in want]
    if extra:
        raise BundleChecksumError(f"bundle {folder} holds files {CHECKSUMS} does not list: {', '.join(extra[:5])}")
    return want


def read_manifest(folder: str | os.PathLike) -> dict:
    """``bundle.json``, checked for the format name and a version this code reads."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{folder} is not a bundle: {MANIFEST} is missing")
    return _check_manifest(path.read_bytes(), path, folder)


def _check_manifest(data: bytes, path, bundle) -> dict:
    """The parsed ``bundle.json`` at ``path`` (of bundle ``bundle``), checked (see :func:`read_manifest`)."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise InvalidFileError(f"invalid bundle file {path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise InvalidFileError(f"invalid bundle file {path}: format must be {FORMAT!r}, got "
                               f"{doc.get('format') if isinstance(doc, dict) else doc!r}")
    version = doc.get("version")
    if not isinstance(version, int) or version < 1 or version > VERSION:
        raise BundleError(f"bundle {bundle} has format version {version!r}; this visionscale reads versions 1 to "
                          f"{VERSION}: upgrade visionscale")
    if doc.get("kind") not in ("anomaly", "face"):
        raise InvalidFileError(f"invalid bundle file {path}: kind must be 'anomaly' or 'face', got {doc.get('kind')!r}")
    return doc


def archive_manifest(archive: str | os.PathLike) -> dict | None:
    """``bundle.json`` of a ``.tar`` / ``.zip`` bundle, read without unpacking and checked as
    :func:`read_manifest` checks it; None when the file is not such an archive or has no
    ``bundle.json`` at its root."""
    p = Path(archive)
    if not p.is_file():
        return None
    try:
        if zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as zf:
                data = zf.read(MANIFEST) if MANIFEST in zf.namelist() else None
        elif tarfile.is_tarfile(p):
            with tarfile.open(p) as tf:
                try:
                    member = tf.getmember(MANIFEST)
                except KeyError:
                    return None
                fh = tf.extractfile(member) if member.isfile() else None
                data = fh.read() if fh is not None else None
        else:
            return None
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError):
        return None
    return None if data is None else _check_manifest(data, f"{p}:{MANIFEST}", p)


def _safe_member(name: str) -> bool:
    p = Path(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts


def unpack(archive: Path, dest: Path) -> None:
    """Extract a ``.tar`` / ``.zip`` bundle into ``dest``; members that would land outside it,
    links and special files are refused."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    if not _safe_member(info.filename):
                        raise BundleError(f"archive {archive} has an unsafe member {info.filename!r}")
                zf.extractall(dest)
            return
        with tarfile.open(archive) as tf:
            for m in tf.getmembers():
                if not _safe_member(m.name) or not (m.isfile() or m.isdir()):
                    raise BundleError(f"archive {archive} has an unsafe member {m.name!r} (links, devices and paths "
                                      f"outside the bundle are refused)")
            tf.extractall(dest, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise BundleError(f"cannot read bundle archive {archive}: {exc}") from None


def pack(folder: Path, archive: Path, kind: str) -> None:
    """Write ``folder``'s bundle files into ``archive`` (``kind`` tar or zip), at its root."""
    files = _files(folder) + [CHECKSUMS]
    if kind == "zip":
        with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for rel in files:
                zf.write(folder / rel, rel)
    elif kind == "tar":
        with tarfile.open(archive, "w") as tf:
            for rel in files:
                tf.add(folder / rel, rel, recursive=False)
    else:
        raise BundleError(f"archive must be one of {', '.join(ARCHIVES)}, got {kind!r}").about("archive")


def open_folder(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(folder with the bundle's files, temporary folder to remove later or None) for a bundle
    folder or archive."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p, None
    if not p.exists():
        raise BundleError(f"bundle not found: {p}")
    tmp = Path(tempfile.mkdtemp(prefix="visionscale-bundle-"))
    try:
        unpack(p, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp, tmp


def require(module: str, what: str):
    """Import an optional package a bundle needs at inference, or say which one is missing."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(f"{what} needs the {module} package: pip install {module}") from None


def session(path: Path, providers=None, threads: int | None = None, what: str = "a bundle's predictor"):
    """An ONNX Runtime session for one of a bundle's graphs (``threads``: intra-op threads).

    ``providers``: aliases (``cpu``, ``cuda``, ``tensorrt``) or full names, a list or a comma
    string; default the CPU provider. Every one must be offered by the installed onnxruntime and
    enabled by the session: asking for CUDA never quietly runs on the CPU (a BundleError says
    what ONNX Runtime said instead)."""
    from visionscale.io.ort import open_session, provider_names

    ort = require("onnxruntime", what)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = check_int("threads", threads, minimum=1)
    wanted = provider_names(ort, providers or ["CPUExecutionProvider"], BundleError)
    return open_session(ort, path, wanted, opts, unavailable=BundleError, failed=BundleError)
