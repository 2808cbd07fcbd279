"""The CLI's one error boundary and its literal text: what every command relies on."""

from __future__ import annotations

import errno

import pytest
import typer
from typer.testing import CliRunner

from visionscale.cli._common import CLIGroup, fail, note, out, warn
from visionscale.errors import InvalidFileError

RAISES = {
    "library": lambda: (_ for _ in ()).throw(InvalidFileError("run.json: field 'threshold' is NaN")),
    "full-disk": lambda: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device", "/data/out/results.json")),
    "read-only": lambda: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system", "/mnt/ro/x.png")),
    "bug": lambda: 1 / 0,
}


def _app() -> typer.Typer:
    app = typer.Typer(cls=CLIGroup)

    @app.command()
    def boom(kind: str) -> None:
        RAISES[kind]()

    @app.command()
    def say(text: str) -> None:
        out.print(text)
        warn(text)
        note(text)
        fail(text)

    return app


@pytest.mark.parametrize("kind,line", [
    ("library", "error: run.json: field 'threshold' is NaN"),
    ("full-disk", "error: cannot access /data/out/results.json: No space left on device"),
    ("read-only", "error: cannot access /mnt/ro/x.png: Read-only file system"),
])
def test_expected_failures_are_one_line_and_exit_2(kind, line):
    res = CliRunner().invoke(_app(), ["boom", kind])
    assert res.exit_code == 2
    assert res.output.strip() == line
    assert "Traceback" not in res.output


def test_a_bug_keeps_its_traceback():
    res = CliRunner().invoke(_app(), ["boom", "bug"])
    assert isinstance(res.exception, ZeroDivisionError)


@pytest.mark.parametrize("text", ["Smith [/tmp]", "Ada [guest]", "[bold red]not red[/]", "a[/]b", ":smile: [link=x]y[/link]"])
def test_user_text_is_printed_literally(text):
    res = CliRunner().invoke(_app(), ["say", text])
    assert res.exit_code == 2
    assert res.output.splitlines() == [text, f"warning: {text}", f"note: {text}", f"error: {text}"]
