"""The root of every error visionscale raises on purpose.

Each library error subclasses :class:`VisionscaleError` (and, for compatibility with code that
caught them before the root existed, the built-in type it used to be). The CLI turns any
``VisionscaleError`` into one line ``error: <message>`` and exit status 2; anything else is a
bug and keeps its traceback. Messages speak of fields and files, never of CLI flags.
"""

from __future__ import annotations


class VisionscaleError(Exception):
    """Base class of the errors visionscale raises for bad input, files or environments.

    ``fields`` names the settings (config fields, function arguments) the message is about, so a
    front end can name its own spelling of them (the CLI adds its flags) without parsing the text.
    """

    fields: tuple[str, ...] = ()

    def about(self, *fields: str) -> VisionscaleError:
        """Set :attr:`fields` and return the error: ``raise DataError("...").about("skip_bad")``."""
        self.fields = tuple(fields)
        return self


class DeviceError(VisionscaleError, ValueError):
    """A device name that is not understood, or one this machine does not have."""


class OutputError(VisionscaleError, OSError):
    """An output path cannot be written, or writing it would destroy something the user owns."""


class OutputExistsError(OutputError):
    """The output exists and was not written by this kind of visionscale command."""


class SameAsInputError(OutputError):
    """The output path is one of the command's own inputs."""


class RunLockedError(VisionscaleError, RuntimeError):
    """Another process is writing to the same run folder or gallery."""


class InvalidFileError(VisionscaleError, ValueError):
    """A file visionscale wrote (or would read) was edited, truncated or is of the wrong kind."""


class InvalidValueError(VisionscaleError, ValueError):
    """A numeric or named option outside its valid range (NaN, negative, zero where > 0...)."""


class MissingDependencyError(VisionscaleError, ImportError):
    """An optional package that a requested feature needs is not installed; the message says which."""


def check_finite(name: str, value: float, *, minimum: float | None = None, maximum: float | None = None,
                 min_inclusive: bool = True, max_inclusive: bool = True) -> float:
    """Return ``float(value)`` if it is finite and in range, else raise :class:`InvalidValueError`
    about ``name`` (so the CLI can add the flag of that setting)."""
    import math

    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InvalidValueError(f"{name} must be a number, got {value!r}").about(name) from None
    if not math.isfinite(v):
        raise InvalidValueError(f"{name} must be a finite number, got {value!r}").about(name)
    if minimum is not None and (v < minimum or (not min_inclusive and v == minimum)):
        op = ">=" if min_inclusive else ">"
        raise InvalidValueError(f"{name} must be {op} {minimum:g}, got {value!r}").about(name)
    if maximum is not None and (v > maximum or (not max_inclusive and v == maximum)):
        op = "<=" if max_inclusive else "<"
        raise InvalidValueError(f"{name} must be {op} {maximum:g}, got {value!r}").about(name)
    return v


def check_int(name: str, value: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """Return ``value`` if it is an integer in ``[minimum, maximum]``, else raise :class:`InvalidValueError`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidValueError(f"{name} must be an integer, got {value!r}").about(name)
    if minimum is not None and value < minimum:
        raise InvalidValueError(f"{name} must be >= {minimum}, got {value}").about(name)
    if maximum is not None and value > maximum:
        raise InvalidValueError(f"{name} must be <= {maximum}, got {value}").about(name)
    return value
