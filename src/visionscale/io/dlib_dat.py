"""A reader of dlib's serialisation primitives (``dlib/serialize.h``, ``float_details.h``,
``dnn/tensor.h``), enough to read dlib's ``.dat`` model files without dlib.

The primitives:

- integers: one control byte whose low nibble is the number of magnitude bytes that follow
  (little-endian) and whose bit ``0x80`` marks a negative value;
- floats and doubles: an int64 mantissa and an int16 exponent, both in the integer encoding,
  value ``mantissa * 2**exponent``; exponents 32000 / 32001 / 32002 stand for inf / -inf / nan;
- booleans: one ASCII byte, ``'0'`` or ``'1'``;
- strings: a length (integer), then that many bytes;
- tensors (version 2): num_samples, k, nr, nc, then ``num_samples*k*nr*nc`` little-endian float32;
- alias tensors (version 1): the four sizes, no data.

:class:`DatCursor` walks a byte string and raises
:class:`~visionscale.errors.InvalidFileError` naming the file and the byte offset on
truncation or on a value that cannot be what the caller expects.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import numpy as np

from visionscale.errors import InvalidFileError

__all__ = ["DatCursor", "FLOAT_INF", "FLOAT_NINF", "FLOAT_NAN"]

# float_details.h: exponents that encode the non-finite values.
FLOAT_INF = 32000
FLOAT_NINF = 32001
FLOAT_NAN = 32002

# A tensor bigger than this many elements cannot come from a real model file; checking it
# before allocating keeps a corrupt size from asking for terabytes.
_MAX_TENSOR_ELEMENTS = 1 << 31


class DatCursor:
    """A read position over the bytes of a dlib-serialised stream.

    ``name`` (usually the file path) is used in error messages; ``pos`` is the offset of the
    next unread byte.
    """

    def __init__(self, data: bytes | bytearray | memoryview, name: str = "<bytes>", pos: int = 0):
        self.data = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        self.name = str(name)
        self.pos = int(pos)

    # -- errors and raw bytes ------------------------------------------------------------------
    def error(self, message: str, offset: int | None = None) -> InvalidFileError:
        """An :class:`InvalidFileError` about ``message`` at ``offset`` (default: the cursor)."""
        at = self.pos if offset is None else offset
        return InvalidFileError(f"invalid dlib file {self.name}: {message} at byte offset {at}")

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def read_bytes(self, n: int, what: str = "data") -> bytes:
        """The next ``n`` bytes; :class:`InvalidFileError` if fewer are left."""
        if n < 0:
            raise self.error(f"negative length {n} for {what}")
        if self.remaining < n:
            raise self.error(f"truncated: {what} needs {n} bytes, only {self.remaining} left")
        out = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return out

    # -- primitives ----------------------------------------------------------------------------
    def read_int(self, what: str = "integer", *, max_bytes: int = 8, signed: bool = True) -> int:
        """An integer: control byte (low nibble = byte count, 0x80 = negative), then magnitude."""
        start = self.pos
        control = self.read_bytes(1, what)[0]
        size = control & 0x0F
        negative = bool(control & 0x80)
        if control & 0x70:
            raise self.error(f"bad control byte 0x{control:02x} for {what}", start)
        if size > max_bytes:
            raise self.error(f"{what} has {size} bytes, more than the {max_bytes} its type holds", start)
        if negative and not signed:
            raise self.error(f"negative value for unsigned {what}", start)
        value = int.from_bytes(self.read_bytes(size, what), "little")
        return -value if negative else value

    def read_float(self, what: str = "float") -> float:
        """A float or double: int64 mantissa, int16 exponent (32000/1/2 = inf/-inf/nan)."""
        start = self.pos
        mantissa = self.read_int(f"{what} mantissa", max_bytes=8)
        exponent = self.read_int(f"{what} exponent", max_bytes=2)
        if exponent == FLOAT_INF:
            return math.inf
        if exponent == FLOAT_NINF:
            return -math.inf
        if exponent == FLOAT_NAN:
            return math.nan
        try:
            return math.ldexp(float(mantissa), exponent)
        except OverflowError:
            raise self.error(f"{what} {mantissa}*2**{exponent} overflows a double", start) from None

    def read_bool(self, what: str = "boolean") -> bool:
        start = self.pos
        b = self.read_bytes(1, what)
        if b == b"1":
            return True
        if b == b"0":
            return False
        raise self.error(f"{what} must be '0' or '1', got byte 0x{b[0]:02x}", start)

    def read_str(self, what: str = "string", *, max_len: int = 1 << 20) -> str:
        start = self.pos
        n = self.read_int(f"{what} length", signed=False)
        if n > max_len:
            raise self.error(f"{what} length {n} is implausible", start)
        raw = self.read_bytes(n, what)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise self.error(f"{what} is not ASCII", start) from None

    def expect_str(self, expected: str | tuple[str, ...], what: str = "layer tag") -> str:
        """Read a string and check it is ``expected`` (or one of them)."""
        start = self.pos
        options = (expected,) if isinstance(expected, str) else tuple(expected)
        s = self.read_str(what)
        if s not in options:
            want = " or ".join(repr(o) for o in options)
            raise self.error(f"expected {what} {want}, got {s!r}", start)
        return s

    def expect_int(self, expected: int | tuple[int, ...], what: str = "version") -> int:
        start = self.pos
        options = (expected,) if isinstance(expected, int) else tuple(expected)
        v = self.read_int(what)
        if v not in options:
            raise self.error(f"unexpected {what} {v} (expected {' or '.join(map(str, options))})", start)
        return v

    # -- tensors -------------------------------------------------------------------------------
    def _sizes(self, what: str) -> tuple[int, int, int, int]:
        start = self.pos
        sizes = tuple(self.read_int(f"{what} size") for _ in range(4))
        if any(s < 0 for s in sizes):
            raise self.error(f"{what} has a negative size {sizes}", start)
        return sizes  # type: ignore[return-value]

    def read_tensor(self, what: str = "tensor") -> np.ndarray:
        """A version-2 tensor as a float32 array of shape (num_samples, k, nr, nc)."""
        self.expect_int(2, f"{what} version")
        start = self.pos
        sizes = self._sizes(what)
        n = sizes[0] * sizes[1] * sizes[2] * sizes[3]
        if n > _MAX_TENSOR_ELEMENTS:
            raise self.error(f"{what} of shape {sizes} is implausibly large", start)
        raw = self.read_bytes(4 * n, f"{what} data ({n} float32)")
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(sizes)

    def read_alias_tensor(self, what: str = "alias tensor") -> tuple[int, int, int, int]:
        """A version-1 alias tensor: just its shape (num_samples, k, nr, nc)."""
        self.expect_int(1, f"{what} version")
        return self._sizes(what)


def find_dat(name: str, env_var: str) -> Path | None:
    """A dlib model file: ``$env_var`` if set (None when that file is missing), else
    ``models/<name>`` inside an installed ``face_recognition_models`` package, found by path
    without importing it (its ``__init__`` imports ``pkg_resources``); else ``None``."""
    env = os.environ.get(env_var)
    if env:
        p = Path(env)
        return p if p.is_file() else None
    try:
        spec = importlib.util.find_spec("face_recognition_models")
    except (ImportError, ValueError):
        spec = None
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        p = Path(loc) / "models" / name
        if p.is_file():
            return p
    return None
