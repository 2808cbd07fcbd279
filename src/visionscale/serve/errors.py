"""Structured HTTP errors: every error the service answers is ``{"error": {"code", "message", "field"?}}``.

A :class:`ApiError` carries its HTTP status; :func:`from_library_error` maps the library's own
errors (:class:`~visionscale.errors.VisionscaleError` subclasses, raised on purpose for bad input)
to a 4xx status, so bad input never reads as a 500. Only bugs give 500.
"""

from __future__ import annotations

from visionscale.errors import (InvalidFileError, InvalidValueError, MissingDependencyError, RunLockedError,
                                VisionscaleError)

__all__ = ["ApiError", "from_library_error", "error_body"]


class ApiError(VisionscaleError):
    """An answer with a 4xx/5xx status; ``code`` is a stable machine-readable word."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        if field:
            self.fields = (field,)


def error_body(code: str, message: str, field: str | None = None) -> dict:
    err = {"code": code, "message": message}
    if field:
        err["field"] = field
    return {"error": err}


def _name(exc: BaseException) -> str:
    return type(exc).__name__


def from_library_error(exc: BaseException, field: str | None = None) -> ApiError:
    """The HTTP answer for an error raised while serving one request (bad input: 4xx)."""
    if isinstance(exc, ApiError):
        return exc
    f = field or (exc.fields[0] if isinstance(exc, VisionscaleError) and exc.fields else None)
    msg = str(exc)
    name = _name(exc)
    if name in ("ImageReadError", "DataError"):
        return ApiError(422, "unreadable_image", msg, f or "file")
    if name in ("NoFaceError", "FaceTooSmallError"):
        return ApiError(422, "no_face", msg, f or "file")
    if name == "MemoryBudgetError":
        return ApiError(413, "image_too_large", msg, f or "file")
    if name == "ModelMismatchError":
        return ApiError(409, "model_mismatch", msg, f)
    if name in ("GalleryError", "SchemaError"):
        return ApiError(400, "gallery_error", msg, f)
    if isinstance(exc, RunLockedError):
        return ApiError(409, "locked", msg, f)
    if isinstance(exc, MissingDependencyError):
        return ApiError(503, "unavailable", msg, f)
    if isinstance(exc, (InvalidValueError, InvalidFileError, VisionscaleError)):
        return ApiError(422, "invalid_input", msg, f)
    return ApiError(500, "internal", f"internal error ({name}); see the server log")
