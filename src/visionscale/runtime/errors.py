"""Errors of the runtime package. Each message names what was asked for and what is there."""

from __future__ import annotations

from visionscale.errors import VisionscaleError


class RunnerError(VisionscaleError, ValueError):
    """Bad arguments to a Runner, an export or a benchmark (unknown backend, wrong shape...)."""


class BackendUnavailableError(VisionscaleError, RuntimeError):
    """A requested backend, execution provider or precision cannot run on this machine.

    Raised instead of falling back silently: asking for CUDA and getting the CPU is the
    most common way a "faster" deployment turns out slower.
    """


class ExportError(VisionscaleError, RuntimeError):
    """A model cannot be exported (or its export failed); the message says why."""
