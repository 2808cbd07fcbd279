"""The study's package was renamed profiling -> study; the old import paths still work, and warn."""

from __future__ import annotations

import subprocess
import sys


def test_old_profiling_paths_are_the_study_modules_and_warn():
    code = ("import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
            "try:\n    import visionscale.profiling\nexcept DeprecationWarning as w:\n    print('warned:', w)\n"
            "warnings.simplefilter('ignore')\n"
            "import visionscale.profiling.sweep as old, visionscale.study.sweep as new\n"
            "from visionscale.profiling import run_study\n"
            "print(old is new, run_study is new.run_study)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "warned: visionscale.profiling was renamed visionscale.study" in out
    assert out.strip().endswith("True True")
