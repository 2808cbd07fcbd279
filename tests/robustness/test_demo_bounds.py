"""Demo-data generators check their numbers before writing anything."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from visionscale.cli.main import app


@pytest.mark.parametrize("args,field", [
    (["--test-good", "-1"], "num_test_good"),
    (["--size", "100000"], "size"),
    (["--size", "8"], "size"),
    (["--train", "0"], "num_train"),
])
def test_ad_make_demo_rejects_out_of_range_numbers_before_writing(tmp_path, args, field):
    out = tmp_path / "demo"
    res = CliRunner().invoke(app, ["ad", "make-demo", str(out), "--categories", "brick", *args])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: ") and field in res.output and len(res.output.strip().splitlines()) == 1
    assert not out.exists()
