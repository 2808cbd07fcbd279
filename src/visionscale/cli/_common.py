"""What every ``visionscale`` sub-command shares: the two consoles and how errors are printed.

Results go to stdout (``out``), notes, warnings and errors to stderr (``err``). ``fail`` prints
one line ``error: <message>`` and exits with status 2: the CLI's code for bad input.

Both consoles have Rich markup switched **off**: every string printed (a person's name, a path,
a table cell) appears literally, so ``"Smith [/tmp]"`` can neither crash the CLI nor lose its
brackets. Colour comes only from ``style=`` arguments and :class:`rich.text.Text` pieces, never
from text. :class:`CLIGroup` is the error boundary of every command: a
:class:`~visionscale.errors.VisionscaleError` or a failed file write (permission denied,
read-only or full file system, a file where a folder should be) becomes one line and exit 2.
Anything else is a bug: :class:`CLIApp` (the root app) prints its traceback and then one line
asking to report it, and exits 1.

Library code reports progress and caveats through :mod:`logging` (``logging.getLogger(__name__)``
under ``visionscale``); :func:`install_log_handler` renders those records on ``err`` as
``note: ...`` (INFO) and ``warning: ...`` (WARNING and above), by level, never by their text.
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import NoReturn

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

err = Console(stderr=True, soft_wrap=True, markup=False, emoji=False)
out = Console(soft_wrap=True, markup=False, emoji=False)


def _line(label: str, style: str, message: str) -> Text:
    return Text.assemble((label, style), " ", str(message))


def fail(message: str, code: int = 2) -> NoReturn:
    err.print(_line("error:", "bold red", message), highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def warn(message: str) -> None:
    """``warning: <message>`` on stderr, the message printed literally."""
    err.print(_line("warning:", "bold yellow", message), highlight=False, soft_wrap=True)


def note(message: str) -> None:
    """``note: <message>`` on stderr, the message printed literally."""
    err.print(_line("note:", "", message), highlight=False, soft_wrap=True)


class ConsoleLogHandler(logging.Handler):
    """Renders ``visionscale`` log records on ``err``: INFO as a note, WARNING and above as a warning."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string in a log call must not end the command
            self.handleError(record)
            return
        # A record logged with ``extra={"fields": (...)}`` names settings: add this command's flags.
        message += error_line_flags(getattr(record, "fields", ()))
        (warn if record.levelno >= logging.WARNING else note)(message)


# -v / -q on the root app: DEBUG, INFO (default) or WARNING and above only.
_LEVEL = {"quiet": logging.WARNING, "normal": logging.INFO, "verbose": logging.DEBUG}
_level = logging.INFO


def set_verbosity(verbose: bool = False, quiet: bool = False) -> None:
    global _level
    _level = _LEVEL["verbose" if verbose else "quiet" if quiet else "normal"]
    install_log_handler()


def install_log_handler() -> None:
    """Route the ``visionscale`` loggers to ``err`` (once per process; the level is re-applied)."""
    logger = logging.getLogger("visionscale")
    if not any(isinstance(h, ConsoleLogHandler) for h in logger.handlers):
        logger.addHandler(ConsoleLogHandler())
    logger.setLevel(_level)


def bug_line(exc: BaseException) -> str:
    from visionscale import __version__

    return (f"this is a bug in visionscale {__version__} ({type(exc).__name__}), not a problem with your input; "
            f"please report it with the traceback above")


# errno values that mean "this output cannot be written here", not a bug.
_WRITE_ERRNOS = {"EACCES", "EPERM", "EROFS", "ENOSPC", "EDQUOT", "ENOTDIR", "EISDIR", "EEXIST",
                 "ENAMETOOLONG", "EFBIG", "ENOENT", "ELOOP", "EMLINK", "ETXTBSY"}


def describe_os_error(exc: OSError) -> str | None:
    """One line for an OSError about a file (``cannot write X: No space left on device``), or None."""
    import errno as _errno

    name = _errno.errorcode.get(exc.errno or -1)
    if name not in _WRITE_ERRNOS:
        return None
    where = exc.filename if exc.filename is not None else "a file"
    if exc.filename2 is not None:
        where = f"{exc.filename} -> {exc.filename2}"
    return f"cannot access {where}: {exc.strerror or exc}"


def _flags_for(group, ctx, fields: tuple[str, ...]) -> str:
    """`` (--flag, ...)`` for the settings an error is about that the invoked command has as options."""
    cmd = group.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None
    return _flags(cmd, fields)


def error_line(exc) -> str:
    """A VisionscaleError's message plus the running command's flags for its fields, for commands
    that catch library errors themselves (so they also work in an app without :class:`CLIGroup`)."""
    return str(exc) + error_line_flags(getattr(exc, "fields", ()))


def error_line_flags(fields: tuple[str, ...]) -> str:
    """`` (--flag, ...)`` of the running command for ``fields`` ("" outside a command)."""
    try:  # newer typer vendors click as typer._click; older ones use click itself
        from typer._click.globals import get_current_context
    except ImportError:
        from click import get_current_context

    ctx = get_current_context(silent=True)
    return _flags(ctx.command if ctx is not None else None, tuple(fields))


def _flags(cmd, fields: tuple[str, ...]) -> str:
    if cmd is None or not fields:
        return ""
    # A field names an option by its parameter name or by its spelling (``out`` is ``--out`` even
    # where the parameter is called ``run_dir``).
    longs = [(p.name, [o for o in getattr(p, "opts", ()) if o.startswith("--")]) for p in cmd.params]
    opts = {name: long[0] for name, long in longs if long}
    for _, long in longs:
        for o in long:
            opts.setdefault(o[2:].replace("-", "_"), o)
    flags = list(dict.fromkeys(opts[f] for f in fields if f in opts))
    return f" ({', '.join(flags)})" if flags else ""


class CLIGroup(TyperGroup):
    """Typer group whose ``invoke`` turns expected failures into one-line errors (exit 2)."""

    def invoke(self, ctx):  # noqa: D401 - click API
        from visionscale.errors import VisionscaleError

        install_log_handler()
        try:
            return super().invoke(ctx)
        except VisionscaleError as exc:
            fail(str(exc) + _flags_for(self, ctx, exc.fields))
        except MemoryError:
            fail("out of memory (host RAM); use smaller images or batches")
        except OSError as exc:
            line = describe_os_error(exc)
            if line is None:
                raise
            fail(line)
        except RuntimeError as exc:
            # CUDA out of memory surfaces as torch.OutOfMemoryError (a RuntimeError).
            if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).split("\n")[0].lower():
                first = str(exc).split("\n")[0]
                fail(f"out of GPU memory: {first}; use a smaller image size, batch or another device")
            raise


class CLIApp(typer.Typer):
    """The root typer app. Expected failures never get here (:class:`CLIGroup` turned them into
    exit 2); an exception that does is a bug: its traceback, then a line asking to report it, exit 1.

    Only calling the app (the ``visionscale`` script) goes through here; a test's
    ``CliRunner().invoke(app)`` sees the exception itself."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the last boundary: everything left is a bug
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
            err.print(_line("bug:", "bold red", bug_line(exc)), highlight=False, soft_wrap=True)
            raise SystemExit(1) from None


def split_csv(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [t.strip() for t in text.split(",") if t.strip()]


def note_runner(forward) -> None:
    """``note: running <backend> <precision> on <device>[, provider P]`` on stderr when ``forward``
    is a :class:`visionscale.runtime.Runner` or its ``runtime_info`` (nothing for eager FP32)."""
    info = forward if isinstance(forward, dict) else getattr(forward, "info", None)
    if isinstance(info, dict) and (info.get("backend"), info.get("precision")) != ("eager", "fp32"):
        provider = f", provider {info['provider']}" if "provider" in info else ""
        what = f"running {info['backend']} {info['precision']} on {info['device']}{provider}"
        note(what)


def note_nodes(info: dict) -> None:
    """Where a Ray job's images were computed, on stderr: ``ray: 8 image(s) on 2 node(s) (...)``."""
    nodes = info.get("nodes") or {}
    if not nodes:
        return
    per = ", ".join(f"{node[:8]}: {n}" for node, n in sorted(nodes.items(), key=lambda kv: -kv[1]))
    note(f"ray: {sum(nodes.values())} image(s) on {len(nodes)} node(s) ({per})")

