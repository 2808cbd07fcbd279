"""`--engine ray --address HOST:PORT` against a real two-node Ray cluster on this machine.

``ray.cluster_utils.Cluster`` starts a head node and a second node (two raylets, one CPU each),
as ``ray start --head`` and ``ray start --address`` would on two machines; the command runs as a
separate driver process, as a user's would, and connects by address. With two workers of one
CPU each, Ray must place one worker on each node: the command says how many images each node
scored, and the files equal the local engine's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")

from visionscale.anomaly import train as T  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="module")
def two_nodes():
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        cluster.shutdown()


def test_ad_predict_on_a_two_node_cluster_equals_local(two_nodes, brick_demo, tmp_path):
    run = tmp_path / "run"
    T.fit_patchcore(brick_demo, run, T.FitConfig(model="patchcore_tiny", image_size=64, batch_size=4, device="cpu"))
    images = tmp_path / "imgs"
    images.mkdir()
    # 12 images in passes of one: enough work that the second node's worker gets some of it.
    tests = sorted((brick_demo / "test").glob("*/*.png"))
    for k in range(12):
        p = tests[k % len(tests)]
        shutil.copy(p, images / f"{k:02d}_{p.parent.name}_{p.name}")

    from visionscale.cli.main import app

    local = CliRunner().invoke(app, ["ad", "predict", str(run), str(images), "--out", str(tmp_path / "local"),
                                     "--batch-size", "1", "--device", "cpu"])
    assert local.exit_code == 0, local.output
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "visionscale.cli.main", "ad", "predict", str(run), str(images),
                           "--out", str(tmp_path / "cluster"), "--batch-size", "1", "--device", "cpu",
                           "--engine", "ray", "--address", two_nodes, "--workers", "2"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ray: 2 worker(s) of 1 CPU each for 12 image(s)" in proc.stderr
    m = re.search(r"ray: 12 image\(s\) on (\d) node\(s\) \(([^)]*)\)", proc.stderr)
    assert m, proc.stderr[-3000:]
    assert m.group(1) == "2"  # both nodes scored images
    assert sum(int(x.split(": ")[1]) for x in m.group(2).split(", ")) == 12
    names = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "cluster").iterdir())
    for n in names:
        a, b = (tmp_path / "local" / n).read_bytes(), (tmp_path / "cluster" / n).read_bytes()
        if n.startswith("predictions."):  # records name their output folder
            a = a.replace(str(tmp_path / "local").encode(), str(tmp_path / "cluster").encode())
        assert a == b, n
