"""ONNX Runtime sessions whose execution providers are what was asked for, without torch.

Shared by the runtime's ONNX Runtime backend (``visionscale.runtime.backends.onnxruntime``)
and the torch-free bundle predictors (``visionscale.bundle``). ONNX Runtime itself drops a
provider it cannot initialise (a CUDA provider without matching CUDA/cuDNN libraries) and
quietly runs on the CPU; :func:`open_session` reads the providers back with
``session.get_providers()`` and raises when one that was asked for is missing.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
from pathlib import Path

__all__ = ["PROVIDER_ALIASES", "CUDA_PROVIDERS", "provider_names", "capture_output", "preload_cuda_libraries",
           "provider_failure", "open_session"]

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
    "rocm": "ROCMExecutionProvider",
}


@contextlib.contextmanager
def capture_output(into: list[str]):
    """Collect what is written to the process's stdout and stderr (file descriptors 1 and 2,
    native code included) while the block runs, and append it to ``into`` as one string.

    onnxruntime-gpu reports why a provider failed (``libcublasLt.so.13: cannot open shared
    object file``) from C++ on stderr and prints its fallback notice ("EP Error ... Falling back
    to ['CPUExecutionProvider'] and retrying") on stdout, where it would corrupt ``--json``
    output; the Runner puts the reason into its error instead.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    with tempfile.TemporaryFile() as tmp:
        try:
            saved = [os.dup(1), os.dup(2)]
        except OSError:  # no file descriptors to redirect (an embedded interpreter): capture nothing
            yield
            return
        py_out, py_err = sys.stdout, sys.stderr
        text = io.TextIOWrapper(tmp, encoding="utf-8", errors="replace", write_through=True)
        try:
            os.dup2(tmp.fileno(), 1)
            os.dup2(tmp.fileno(), 2)
            sys.stdout = sys.stderr = text  # Python-level prints (also when pytest or rich replaced the streams)
            yield
        finally:
            sys.stdout, sys.stderr = py_out, py_err
            text.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            tmp.seek(0)
            into.append(tmp.read().decode("utf-8", errors="replace"))
            text.detach()


CUDA_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
_preloaded = False


def preload_cuda_libraries(ort) -> None:
    """``onnxruntime.preload_dlls()`` (onnxruntime-gpu >= 1.21) once per process: loads CUDA and
    cuDNN from the ``nvidia-*`` pip packages (``pip install onnxruntime-gpu[cuda,cudnn]``) or a
    compatible PyTorch, so the CUDA provider finds them without ``LD_LIBRARY_PATH``."""
    global _preloaded
    if _preloaded or not hasattr(ort, "preload_dlls"):
        return
    _preloaded = True
    try:
        ort.preload_dlls()
    except Exception:  # noqa: BLE001 - best effort; the session check below says what failed
        pass


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def provider_failure(text: str) -> str:
    """The lines of ONNX Runtime's output that say why a provider failed, condensed to one line:
    the provider library that did not load and why, and what the provider requires."""
    session, preload = [], []
    for line in _ANSI.sub("", text).splitlines():
        line = line.strip()
        m = re.search(r"Failed to load library (\S+) with error: (.+)", line)
        if m:
            session.append(f"{Path(m.group(1)).name}: {m.group(2).strip()}")
        elif "Failed to create" in line:
            session.append(re.sub(r"^.*?\] ", "", line).split(" Please ")[0].rstrip("."))
        elif m := re.search(r"Failed to load (lib\S+?): (.+)", line):  # onnxruntime.preload_dlls
            preload.append(m.group(2).strip())
    return "; ".join(dict.fromkeys(session or preload))[:600]


def provider_names(ort, providers, error: type[Exception]) -> list[str]:
    """Full provider names for ``providers`` (aliases ``cpu``, ``cuda``, ``tensorrt``... or full
    names; a comma string or a list), each checked as offered by this onnxruntime build.

    Raises:
        error: None given, or one not in this build (the message lists what is there).
    """
    items = providers.split(",") if isinstance(providers, str) else list(providers)
    wanted = [PROVIDER_ALIASES.get(p.strip().lower(), p.strip()) for p in items if p.strip()]
    if not wanted:
        raise error("no execution providers given")
    have = list(ort.get_available_providers())
    missing = [p for p in wanted if p not in have]
    if missing:
        hint = " (install onnxruntime-gpu, matching your CUDA and cuDNN, for the CUDA and TensorRT providers)" \
            if any(p in CUDA_PROVIDERS for p in missing) else ""
        raise error(f"ONNX Runtime execution provider(s) {', '.join(missing)} requested but not available; the "
                    f"installed onnxruntime {ort.__version__} offers: {', '.join(have)}{hint}. Not falling back.")
    return wanted


def open_session(ort, path: str | Path, providers: list[str], opts, *, unavailable: type[Exception],
                 failed: type[Exception]):
    """``ort.InferenceSession(path, opts, providers)`` that runs on every provider asked for.

    ``providers`` are full names (:func:`provider_names`). What ONNX Runtime prints while the
    session starts is captured; on success it is passed on to stderr, on a dropped provider its
    reason goes into the error.

    Raises:
        failed: ONNX Runtime cannot load the file.
        unavailable: The session dropped a provider that was asked for.
    """
    said: list[str] = []
    try:
        with capture_output(said):
            if any(p in CUDA_PROVIDERS for p in providers):
                preload_cuda_libraries(ort)
            session = ort.InferenceSession(str(path), opts, providers=list(providers))
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise failed(f"ONNX Runtime cannot load {path} with {list(providers)}: {str(exc).splitlines()[0][:300]}"
                     ) from None
    used = list(session.get_providers())
    dropped = [p for p in providers if p not in used]
    if dropped:
        why = provider_failure(said[0] if said else "")
        raise unavailable(
            f"ONNX Runtime did not enable {', '.join(dropped)} for {path} (the session runs on {', '.join(used)}); "
            + (f"it said: {why.rstrip('.')}. " if why else "usually the CUDA/cuDNN/TensorRT libraries it needs are "
               "missing or mismatched. ") + "Not falling back.")
    if said and said[0].strip():
        sys.stderr.write(said[0])  # what it printed while the session started, now that it ran as asked
    return session
