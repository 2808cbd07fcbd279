"""Runtime: ONNX export + ONNX Runtime parity per model family, the Runner's providers and
precisions, torch.compile, and the export/bench CLI. CPU only; GPU paths are refused with
a clear error here, and that refusal is what is tested."""

import importlib
import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from visionscale.registry import list_models
from visionscale.runtime import BackendUnavailableError, ExportError, Runner, RunnerError

ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'visionscale[onnx]')")
pytest.importorskip("onnxscript", reason="onnxscript not installed (pip install 'visionscale[onnx]')")

from visionscale.runtime.export import export_onnx  # noqa: E402  (needs the packages above)


ALL = {"batch": True, "height": True, "width": True}
BATCH_ONLY = {"batch": True, "height": False, "width": False}


def _face_models() -> list[tuple]:
    """Tiny face models, when the face package that registers them exists in this checkout
    (not yet in the registry's module list, so imported here)."""
    for module in ("visionscale.face.embedder", "visionscale.face.blazeface"):
        try:
            importlib.import_module(module)
        except ImportError:
            continue
    found = [(name, 64, ALL, ["output"]) for name in list_models("face_embedder_tiny")]
    # BlazeFace: fixed 128 px input (its anchors), batch dynamic; (regressors, scores) tuple
    found += [(name, 128, BATCH_ONLY, ["output0", "output1"]) for name in list_models("blazeface_tiny")]
    return found


def tiny_classifier():
    from visionscale.classify.model import Classifier, ClassifierConfig

    torch.manual_seed(0)
    return Classifier(ClassifierConfig("resnet_tiny", ("cat", "dog", "fox"), image_size=64))


def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2, padding=1)).eval()


# (model, example size, expected dynamic axes (None: exported static), expected output names)
FAMILIES = [
    ("efficientad_tiny", 128, ALL, ["anomaly_map", "pred_score"]),
    ("patchcore_tiny", 64, None, ["anomaly_map", "pred_score"]),
    ("classifier", 64, ALL, ["output"]),
] + _face_models()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Export each family once per test module (exports take seconds each)."""
    cache = {}

    def get(name, size, dynamic):
        if name not in cache:
            torch.manual_seed(0)
            model = tiny_classifier() if name == "classifier" else name
            path = tmp_path_factory.mktemp("onnx") / f"{name}.onnx"
            cache[name] = export_onnx(model, path, image_size=size, dynamic=dynamic is not None)
        return cache[name]

    return get


@pytest.mark.parametrize("name,size,dynamic,outputs", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_onnx_export_matches_eager_fp32(exports, name, size, dynamic, outputs):
    res = exports(name, size, dynamic)
    assert res.parity_ok, res.parity
    assert res.outputs["names"] == outputs
    assert all(c["max_abs"] < 1e-3 for c in res.parity)
    side = json.loads(open(res.sidecar).read())
    assert side["parity"][0]["max_abs"] == res.parity[0]["max_abs"]  # the report is on disk too
    sess = ort.InferenceSession(res.path, providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == outputs  # stable names in the graph itself
    if dynamic:
        assert res.dynamic == dynamic
        assert len(res.parity) == 2 and res.parity[1]["shape"] != res.parity[0]["shape"]  # checked at a 2nd shape
    else:
        assert all(isinstance(d, int) for d in res.input_shape)


def test_onnx_runner_returns_what_the_eager_model_returns(exports):
    res = exports("efficientad_tiny", 128, ALL)
    runner = Runner(res.path, backend="onnxruntime", device="cpu")
    assert runner.info["provider"] == "CPUExecutionProvider"
    assert runner.info["providers"] == ["CPUExecutionProvider"]
    # the eager model with the same weights: rebuild it from the seed the fixture used
    torch.manual_seed(0)
    from visionscale.registry import create

    eager = create("efficientad_tiny").eval()
    x = torch.rand(3, 3, 96, 160)  # a third shape, neither export nor parity shape
    with torch.inference_mode():
        ref = eager(x)
    got = runner(x)
    assert set(got) == {"anomaly_map", "pred_score"} and got["anomaly_map"].shape == (3, 1, 96, 160)
    torch.testing.assert_close(got["pred_score"], ref["pred_score"], rtol=1e-4, atol=1e-5)
    with pytest.raises(RunnerError, match="outside the range"):
        runner(torch.rand(1, 3, 48, 64))  # below the 64 px the export is valid for


def test_static_export_refuses_other_shapes(exports):
    res = exports("patchcore_tiny", 64, None)
    runner = Runner(res.path, backend="onnxruntime", device="cpu")
    with pytest.raises(RunnerError, match="static input"):
        runner(torch.rand(1, 3, 96, 96))


def test_ddad_exports_with_its_sampling_noise_frozen_and_matches_eager(tmp_path):
    """DDAD draws noise from seeded generators: the export holds those draws for one shape,
    so ONNX Runtime gives eager's outputs there; a Runner scores other batch sizes image by image."""
    from visionscale.registry import create

    few_steps = {"noise_step": 50, "skip": 25}  # 2 DDIM steps: the same graph, exported in seconds
    torch.manual_seed(0)
    res = export_onnx("ddad_tiny", tmp_path / "d.onnx", image_size=32, model_kwargs=few_steps)
    assert res.parity[0]["ok"] and all(c["max_abs"] < 1e-4 for c in res.parity)
    assert any("frozen" in n for n in res.notes)
    runner = Runner(res.path, backend="onnxruntime", device="cpu")
    torch.manual_seed(0)
    eager = create("ddad_tiny", **few_steps).eval()
    assert eager.num_steps == 2
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.inference_mode():
        ref = eager(x)
    got = runner(x)
    torch.testing.assert_close(got["pred_score"], ref["pred_score"], rtol=1e-4, atol=1e-5)
    assert runner(torch.rand(3, 3, 32, 32))["anomaly_map"].shape == (3, 1, 32, 32)
    with pytest.raises(RunnerError, match="static input"):
        runner(torch.rand(1, 3, 64, 64))


def test_bad_export_input_names_the_problem(tmp_path):
    with pytest.raises(RunnerError, match="unknown model 'nope'"):
        export_onnx("nope", tmp_path / "x.onnx")
    with pytest.raises(RunnerError, match="cannot run at 16x16"):
        export_onnx("efficientad_tiny", tmp_path / "x.onnx", image_size=16)
    with pytest.raises(ExportError, match="bf16"):
        export_onnx(conv_net(), tmp_path / "x.onnx", precision="bf16")
    assert not list(tmp_path.iterdir())


def test_runner_refuses_a_provider_that_is_not_installed():
    have = ort.get_available_providers()
    if "CUDAExecutionProvider" in have:
        pytest.skip("this onnxruntime build has the CUDA provider")
    with pytest.raises(BackendUnavailableError, match="CUDAExecutionProvider.*CPUExecutionProvider"):
        Runner(conv_net(), backend="onnxruntime", providers=["cuda"])


def test_runner_refuses_a_provider_the_session_dropped(exports, monkeypatch):
    """ONNX Runtime drops a provider it cannot initialise and runs on the CPU; we raise."""
    res = exports("classifier", 64, ALL)
    real = ort.InferenceSession

    class DroppingSession(real):
        def __init__(self, path, opts=None, providers=None):
            super().__init__(path, opts, providers=["CPUExecutionProvider"])  # what ORT does on failure

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", DroppingSession)
    with pytest.raises(BackendUnavailableError, match="did not enable CUDAExecutionProvider.*runs on CPUExecutionProvider"):
        Runner(res.path, backend="onnxruntime", providers=["cuda"])


def test_the_reason_onnxruntime_gives_goes_into_the_error_not_onto_stdout(exports, monkeypatch, capfd):
    """onnxruntime-gpu 1.31 without CUDA libraries (seen on a CPU machine): its C++ log names the
    missing library on stderr and its Python layer prints the fallback on stdout, which would
    corrupt `--json` output. The Runner captures both and quotes the reason."""
    import os

    res = exports("classifier", 64, ALL)
    real = ort.InferenceSession

    class FailingCudaSession(real):
        def __init__(self, path, opts=None, providers=None):
            os.write(2, b"\x1b[1;31m2026-11-24 23:55:59 [E:onnxruntime:Default, provider_bridge_ort.cc:2458 operator()] "
                        b"/onnxruntime_src/core/session/provider_bridge_ort.cc:2043 [ONNXRuntimeError] : 1 : FAIL : "
                        b"Failed to load library /x/capi/libonnxruntime_providers_cuda.so with error: libcublasLt.so.13: "
                        b"cannot open shared object file: No such file or directory\n\x1b[m\n")
            print("EP Error ... when using ['CUDAExecutionProvider']\nFalling back to ['CPUExecutionProvider'] and retrying.")
            super().__init__(path, opts, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", FailingCudaSession)
    capfd.readouterr()
    with pytest.raises(BackendUnavailableError,
                       match=r"it said: libonnxruntime_providers_cuda.so: libcublasLt.so.13: cannot open shared object"):
        Runner(res.path, backend="onnxruntime", providers=["cuda"])
    captured = capfd.readouterr()
    assert "Falling back" not in captured.out and "libcublasLt" not in captured.err
    print("still printing")  # the streams are restored
    assert capfd.readouterr().out == "still printing\n"


def test_eager_runner_dicts_channels_last_and_info():
    torch.manual_seed(0)
    from visionscale.registry import create

    model = create("efficientad_tiny").eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        ref = model(x)
    for cl in (False, True):
        runner = Runner(model, device="cpu", channels_last=cl)
        got = runner(x)
        assert runner.info["backend"] == "eager" and runner.info["device"] == "cpu" and runner.info["channels_last"] is cl
        torch.testing.assert_close(got["anomaly_map"], ref["anomaly_map"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_on_cpu(precision):
    """bf16/fp16 autocast on the CPU: runs (torch >= 2.1), outputs back in fp32, close to fp32."""
    net = tiny_classifier().eval()
    x = torch.rand(4, 3, 64, 64)
    with torch.inference_mode():
        ref = net(x)
    try:
        runner = Runner(net, precision=precision, device="cpu")
        got = runner(x)
    except (BackendUnavailableError, RuntimeError) as exc:  # a torch build without CPU autocast for it
        pytest.skip(f"{precision} autocast does not run on this CPU/torch: {exc}")
    assert got.dtype == torch.float32 and runner.info["precision"] == precision and runner.info["autocast"]
    assert not torch.equal(got, ref)  # it really ran in lower precision
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()


def test_cuda_only_options_are_refused_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(RunnerError, match="cuda_graphs=True needs a CUDA device"):
        Runner(conv_net(), device="cpu", cuda_graphs=True)
    from visionscale.errors import DeviceError  # the one device resolver's error

    with pytest.raises(DeviceError, match="no CUDA GPU"):
        Runner(conv_net(), device="cuda")
    with pytest.raises(BackendUnavailableError, match="TensorRT needs a CUDA GPU"):
        Runner(conv_net(), backend="tensorrt", device="cpu")
    with pytest.raises(RunnerError, match="backend must be one of"):
        Runner(conv_net(), backend="tvm")


def test_compile_backend_runs_and_reports_compile_time_apart():
    from visionscale.runtime.backends.compile import compile_unavailable_reason

    reason = compile_unavailable_reason()
    if reason:
        pytest.skip(reason)
    net = conv_net()
    x = torch.rand(1, 3, 16, 16)
    runner = Runner(net, backend="compile", device="cpu")
    compile_s = runner.warmup(x, runs=0)
    assert compile_s > 0 and runner.info["compile_seconds"] == {"1x3x16x16": compile_s}
    with torch.inference_mode():
        torch.testing.assert_close(runner(x), net(x), rtol=1e-4, atol=1e-5)
    assert runner.warmup(x, runs=0) == 0.0  # no second compilation for the same shape


# --------------------------------------------------------------------------- CLI


def cli():
    import typer

    from visionscale.cli.runtime import bench_cmd, export_cmd

    app = typer.Typer()
    app.command("export")(export_cmd)
    app.command("bench")(bench_cmd)
    return app


def test_export_cli_writes_model_and_parity_report(tmp_path):
    out = tmp_path / "ssd.onnx"
    res = CliRunner().invoke(cli(), ["export", "ssd_tiny", "--out", str(out), "--image-size", "64", "64", "--static"])
    assert res.exit_code == 0, res.output
    assert "parity vs eager fp32 [2, 3, 64, 64]: max abs" in res.output
    report = json.loads((tmp_path / "ssd.onnx.json").read_text())
    assert report["parity_ok"] and report["outputs"] == {"kind": "tuple", "names": ["output0", "output1"]}
    assert report["input_shape"] == [2, 3, 64, 64]
    runner = Runner(out, backend="onnxruntime", device="cpu")
    cls, box = runner(torch.rand(2, 3, 64, 64))  # the detector's tuple comes back as a tuple
    assert box.shape[-1] == 4 and cls.shape[:2] == box.shape[:2]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.parametrize("args,message", [
    (["nope"], "unknown model"),
    (["efficientad_tiny", "--format", "tflite"], "format must be one of"),
    (["efficientad_tiny", "--format", "tensorrt"], "TensorRT needs a CUDA GPU"),
    (["efficientad_tiny", "--image-size", "0", "64"], "--image-size takes two positive numbers"),
])
def test_export_cli_bad_input(tmp_path, args, message):
    if "tensorrt" in args and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    out = tmp_path / "m.onnx"
    res = CliRunner().invoke(cli(), ["export", *args, "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert not out.exists()


def test_bench_cli_eager_vs_onnxruntime(tmp_path, monkeypatch):
    (tmp_path / "benchnet.py").write_text(
        "import torch, torch.nn as nn\n"
        "torch.manual_seed(0)\n"
        "net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),"
        " nn.Linear(8, 5)).eval()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    res = CliRunner().invoke(cli(), ["bench", "benchnet:net", "--backend", "eager,onnxruntime", "--precision", "fp32,bf16",
                                     "--batch", "1,2", "--image-size", "32", "32", "--device", "cpu", "--warmup", "1",
                                     "--repeats", "3", "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "b" / "bench.json").read_text())
    ok = {(r["backend"], r["precision"], r["batch"]) for r in data["rows"] if r["status"] == "ok"}
    assert {("eager", "fp32", 1), ("eager", "fp32", 2), ("eager", "bf16", 2), ("onnxruntime", "fp32", 1)} <= ok
    unavailable = [r for r in data["rows"] if r["status"] == "unavailable"]
    assert {(r["backend"], r["precision"]) for r in unavailable} == {("onnxruntime", "bf16")}
    assert "bf16" in unavailable[0]["reason"]
    for r in data["rows"]:
        if r["status"] == "ok":
            assert 0 < r["latency_ms_median"] <= r["latency_ms_p95"] + 1e-9 and r["speedup_vs_eager_fp32"] > 0
            assert r["throughput_ips"] == pytest.approx(r["batch"] * 1e3 / r["latency_ms_median"])
    base = next(r for r in data["rows"] if (r["backend"], r["precision"], r["batch"]) == ("eager", "fp32", 1))
    assert base["speedup_vs_eager_fp32"] == 1.0
    onnx = next(r for r in data["rows"] if r["backend"] == "onnxruntime" and r["status"] == "ok")
    assert onnx["provider"] == "CPUExecutionProvider" and onnx["export_seconds"] > 0
    task = {(t["backend"], t["precision"], t["batch"]): t for t in data["task"]}
    assert task[("onnxruntime", "fp32", 2)]["top1_agreement"] == 1.0 and task[("onnxruntime", "fp32", 2)]["max_abs"] < 1e-4
    assert 0 < task[("eager", "bf16", 2)]["max_abs"] < 0.1  # bf16 changes the logits a little
    md = (tmp_path / "b" / "bench.md").read_text()
    assert "| onnxruntime | fp32 | 1 | CPUExecutionProvider |" in md and "top-1 agreement" in md


def test_bench_cli_fails_when_nothing_requested_can_run(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    res = CliRunner().invoke(cli(), ["bench", "efficientad_tiny", "--backend", "tensorrt", "--image-size", "64", "64",
                                     "--device", "cpu", "--repeats", "1", "--warmup", "0"])
    assert res.exit_code == 1
    assert "TensorRT needs a CUDA GPU" in res.output


def test_auroc_per_backend_feeds_a_fixed_batch_export(exports):
    """The AUROC path of `bench --run`: ONNX PatchCore (batch fixed at 1) scores like eager."""
    from pathlib import Path

    from visionscale.anomaly.data import Batch, Sample
    from visionscale.registry import create
    from visionscale.deploy.tasks import anomaly_auroc

    res = exports("patchcore_tiny", 64, None)
    torch.manual_seed(0)
    eager = create("patchcore_tiny").eval()  # same weights as the exported one (same seed)
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(5, 3, 64, 64, generator=gen)
    images[3:] += torch.rand(2, 3, 64, 64, generator=gen) * 2  # "defects": different statistics
    samples = [Sample(Path(f"{i}.png"), int(i >= 3)) for i in range(5)]
    evalset = ([Batch(images[:3], samples[:3]), Batch(images[3:], samples[3:])], [s.label for s in samples])
    a_onnx = anomaly_auroc(Runner(res.path, backend="onnxruntime", device="cpu"), *evalset)
    a_eager = anomaly_auroc(Runner(eager, device="cpu"), *evalset)
    assert a_onnx is not None and a_onnx == pytest.approx(a_eager)


def test_task_metric_says_what_data_is_missing(tmp_path):
    """`bench --data`: each family names the file it needs; a family without a task metric is refused."""
    from visionscale.registry import create
    from visionscale.deploy.bench import BenchConfig
    from visionscale.deploy.tasks import task_metric

    with pytest.raises(RunnerError, match="does not exist"):
        task_metric(create("ssd_tiny"), tmp_path / "nowhere", (64, 64))
    with pytest.raises(RunnerError, match="no val.json"):
        task_metric(create("ssd_tiny"), tmp_path, (64, 64))
    with pytest.raises(RunnerError, match="square inputs"):
        task_metric(create("ssd_tiny"), tmp_path, (64, 96))
    with pytest.raises(RunnerError, match="no pairs.txt or pairsDevTest.txt"):
        task_metric(create("face_embedder_tiny"), tmp_path, (32, 32))
    with pytest.raises(RunnerError, match="EfficientAD is none of them"):
        task_metric(create("efficientad_tiny"), tmp_path, (64, 64))
    with pytest.raises(RunnerError, match="run_dir .* needs its data set"):
        BenchConfig(model="x", run_dir=str(tmp_path)).validate()


def test_provider_failure_condenses_onnxruntime_gpu_output():
    """Lines as onnxruntime-gpu 1.31.1 printed them on a machine without CUDA libraries."""
    from visionscale.io.ort import provider_failure

    text = ("\x1b[1;31m2026-11-24 23:55:59.98 [E:onnxruntime:Default, provider_bridge_ort.cc:2458 operator()] "
            "/src/provider_bridge_ort.cc:2043 onnxruntime::Provider& onnxruntime::ProviderLibrary::Get() "
            "[ONNXRuntimeError] : 1 : FAIL : Failed to load library /x/libonnxruntime_providers_cuda.so with error: "
            "libcublasLt.so.13: cannot open shared object file: No such file or directory\n\x1b[m\n"
            "\x1b[0;93m2026-11-24 23:55:59.98 [W:onnxruntime:Default, onnxruntime_pybind_state.cc:1295 "
            "CreateExecutionProviderFactoryInstance] Failed to create CUDAExecutionProvider. Require cuDNN 9.* and "
            "CUDA 13.*. Please install all dependencies as mentioned in the GPU requirements page.\x1b[m\n"
            "Failed to load libcublasLt.so.13: libcublasLt.so.13: cannot open shared object file\n")
    assert provider_failure(text) == ("libonnxruntime_providers_cuda.so: libcublasLt.so.13: cannot open shared object "
                                      "file: No such file or directory; Failed to create CUDAExecutionProvider. "
                                      "Require cuDNN 9.* and CUDA 13.*")
    preload_only = "Failed to load libcurand.so.10: libcurand.so.10: cannot open shared object file\n"
    assert provider_failure(preload_only) == "libcurand.so.10: cannot open shared object file"
    assert provider_failure("some unrelated warning\n") == ""


def test_bench_combos_measure_exactly_the_pairs_given():
    from visionscale.deploy.bench import BenchConfig, bench

    torch.manual_seed(0)
    res = bench(BenchConfig(conv_net(), combos=(("eager", "bf16"), ("onnxruntime", "fp32")), image_size=(32, 32),
                            device="cpu", warmup=0, repeats=1))
    assert [(r["backend"], r["precision"]) for r in res.rows] == [("eager", "fp32"), ("eager", "bf16"),
                                                                  ("onnxruntime", "fp32")]
    assert res.config["combos"] == [["eager", "fp32"], ["eager", "bf16"], ["onnxruntime", "fp32"]]
    with pytest.raises(RunnerError, match="combos must be"):
        BenchConfig(conv_net(), combos=(("onnx", "fp32"),)).validate()
