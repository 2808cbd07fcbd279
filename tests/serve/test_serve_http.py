"""The service over real HTTP: a uvicorn server on a free 127.0.0.1 port, an httpx client.

Anomaly scores must equal ``ad predict``'s on the same files; bad input must get a 4xx JSON
error (never a 500 or a hang); faces go through the default dlib model and a gallery.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from serve_util import FACE_DATA, free_port, running, serving_process

httpx = pytest.importorskip("httpx")


def _post(base, path, files=None, data=None, headers=None, **kw):
    return httpx.post(base + path, files=files, data=data, headers=headers, timeout=60, **kw)


def _png(path: Path) -> tuple[str, bytes, str]:
    return (path.name, path.read_bytes(), "image/png")


def _error(r, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert set(err) <= {"code", "message", "field"} and err["message"], err
    if code is not None:
        assert err["code"] == code, err
    return err


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG header claiming ``width x height`` pixels and no pixel data (a few dozen bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def server(tiny_run):
    from visionscale.serve import ServeLimits, create_app

    app = create_app(tiny_run, limits=ServeLimits(max_upload_bytes=256 * 1024, max_pixels=1_000_000))
    with running(app) as base:
        yield base


# -- anomaly ---------------------------------------------------------------------------------

def test_scores_labels_and_regions_equal_ad_predict(server, tiny_run, demo_images, tmp_path):
    from visionscale.anomaly.predict import load_run, predict

    run = load_run(tiny_run, "cpu")
    records, _ = predict(run, demo_images, tmp_path / "pred", batch_size=1)
    assert len(records) == len(demo_images) >= 7
    labels = set()
    for rec in records:
        r = _post(server, "/v1/anomaly/score", files={"file": _png(Path(rec["path"]))})
        assert r.status_code == 200, r.text
        got = r.json()
        # Same code, same file, one image per forward pass on both sides: equal up to float32
        # rounding (relative 1e-6 of the score's magnitude, ~8 ulp).
        assert got["score"] == pytest.approx(rec["score"], rel=1e-6, abs=1e-7)
        assert got["normalized_score"] == pytest.approx(rec["normalized_score"], rel=1e-6, abs=1e-7)
        assert got["label"] == rec["label"]
        expected = json.loads(Path(rec["regions_file"]).read_text())["regions"]
        assert [g["box"] for g in got["regions"]] == [g["box"] for g in expected]
        assert got["image_size"] == [64, 64]
        labels.add(got["label"])
        overlay = httpx.get(server + got["overlay_url"], timeout=30)
        assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/png"
        from PIL import Image

        assert Image.open(io.BytesIO(overlay.content)).size == (64, 64)
    assert labels == {"normal", "anomalous"}  # the demo has both, so the label is not constant


def test_a_bundle_is_served_like_its_run(tiny_run, demo_images, tmp_path):
    # The same run exported as a bundle (ONNX Runtime, numpy pre/post-processing) and served:
    # scores equal ad predict's within the bundle's tolerance (ONNX vs eager float32: 1e-4
    # relative, see tests/bundle), labels equal. Served from its .zip archive, as shipped.
    pytest.importorskip("onnxruntime")
    from visionscale.anomaly.predict import load_run, predict
    from visionscale.bundle import write_bundle
    from visionscale.serve import create_app
    from visionscale.serve.services import bundle_kind

    res = write_bundle(tiny_run, tmp_path / "bundle", archive="zip")
    bundle = res.archive
    assert bundle.is_file() and bundle_kind(bundle) == bundle_kind(res.path) == "anomaly"
    assert bundle_kind(tmp_path) is None and bundle_kind(demo_images[0]) is None  # a folder, a PNG
    threshold = json.loads((Path(tiny_run) / "calibration.json").read_text())["image_threshold"]
    records, _ = predict(load_run(tiny_run, "cpu"), demo_images, tmp_path / "pred", batch_size=1)
    with running(create_app(bundle)) as base:
        info = httpx.get(base + "/v1/info", timeout=30).json()
        for rec in records:
            r = _post(base, "/v1/anomaly/score", files={"file": _png(Path(rec["path"]))})
            assert r.status_code == 200, r.text
            assert r.json()["score"] == pytest.approx(rec["score"], rel=1e-4, abs=1e-6)
            # The image threshold is one of the calibration scores (F1-optimal), and these test
            # images were calibration images: a score that IS the threshold may land on either
            # side after ONNX's float32 rounding. Elsewhere the labels must agree.
            if abs(rec["score"] - threshold) > 1e-4 * abs(threshold):
                assert r.json()["label"] == rec["label"]
    assert "bundle" in json.dumps(info).lower()


def test_concurrent_requests_all_answered_with_their_own_scores(server, demo_images):
    expected = {p: _post(server, "/v1/anomaly/score?images=none", files={"file": _png(p)}).json()["score"]
                for p in demo_images[:4]}
    results: dict = {}

    def one(i, p):
        results[i] = (p, _post(server, "/v1/anomaly/score?images=none", files={"file": _png(p)}))

    threads = [threading.Thread(target=one, args=(i, demo_images[i % 4])) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 12
    for p, r in results.values():
        assert r.status_code == 200, r.text
        # Batched with others or not, each request gets its own image's score (float32 batch
        # arithmetic may differ in the last bits: relative 1e-5).
        assert r.json()["score"] == pytest.approx(expected[p], rel=1e-5)
    text = httpx.get(server + "/metrics").text
    count = next(line for line in text.splitlines() if line.startswith('visionscale_batch_size_count{model="anomaly"}'))
    total = next(line for line in text.splitlines() if line.startswith('visionscale_batch_size_sum{model="anomaly"}'))
    assert float(total.split()[-1]) >= 16 and int(count.split()[-1]) <= float(total.split()[-1])


def test_base64_images(server, demo_images):
    import base64

    r = _post(server, "/v1/anomaly/score?images=base64", files={"file": _png(demo_images[0])})
    body = r.json()
    assert base64.b64decode(body["overlay_png_base64"])[:8] == b"\x89PNG\r\n\x1a\n"
    assert base64.b64decode(body["map_png_base64"])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "overlay_url" not in body


def test_bad_uploads_get_4xx_json(server, demo_images):
    good = demo_images[0].read_bytes()
    _error(_post(server, "/v1/anomaly/score", files={"file": ("a.png", b"not an image at all", "image/png")}), 422,
           "not_an_image")
    _error(_post(server, "/v1/anomaly/score", files={"file": ("a.png", good[: len(good) // 2], "image/png")}), 422,
           "unreadable_image")
    _error(_post(server, "/v1/anomaly/score", files={"file": ("a.png", _bomb_png(100_000, 100_000), "image/png")}),
           413, "image_too_large")
    _error(_post(server, "/v1/anomaly/score", files={"file": ("a.png", _bomb_png(2000, 2000), "image/png")}), 413,
           "image_too_large")  # 4 Mpx: above this server's 1 Mpx limit
    _error(_post(server, "/v1/anomaly/score", files={"file": ("a.txt", good, "text/plain")}), 415,
           "unsupported_media_type")
    _error(_post(server, "/v1/anomaly/score", content=good, headers={"content-type": "image/png"}), 415,
           "unsupported_media_type")
    _error(_post(server, "/v1/anomaly/score", files={"file": ("a.png", b"", "image/png")}), 400, "empty_upload")
    err = _error(_post(server, "/v1/anomaly/score", files={"other": ("a.png", good, "image/png")}), 422,
                 "missing_field")
    assert err["field"] == "file"
    _error(_post(server, "/v1/anomaly/score", content=b"", headers={"content-type": "multipart/form-data; boundary=x"}),
           422)
    _error(_post(server, "/v1/anomaly/score", files={"file": ("a.png", b"\0" * (300 * 1024), "image/png")}), 413,
           "request_too_large")
    # a chunked body (no Content-Length) is counted as it arrives, and cut off at the limit
    def chunks():
        yield b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
        yield b"Content-Type: image/png\r\n\r\n"
        for _ in range(40):
            yield b"\0" * 10_000
        yield b"\r\n--x--\r\n"

    _error(_post(server, "/v1/anomaly/score", content=chunks(),
                 headers={"content-type": "multipart/form-data; boundary=x"}), 413, "request_too_large")
    _error(_post(server, "/v1/anomaly/score?images=svg", files={"file": ("a.png", good, "image/png")}), 422)
    _error(httpx.get(server + "/v1/anomaly/results/nope/overlay.png"), 404, "unknown_result")
    _error(httpx.get(server + "/v1/nothing-here"), 404, "not_found")
    _error(httpx.get(server + "/v1/anomaly/score"), 405, "method_not_allowed")
    _error(_post(server, "/v1/face/detect", files={"file": ("a.png", good, "image/png")}), 404, "not_served")
    # after all of that the server still scores, and never answered 5xx
    assert _post(server, "/v1/anomaly/score", files={"file": ("a.png", good, "image/png")}).status_code == 200
    text = httpx.get(server + "/metrics").text
    # (/readyz answers 503 while the model warms up: that is its job, not a failure)
    assert not [line for line in text.splitlines() if 'status="5' in line and "/readyz" not in line], text


def test_health_ready_metrics_and_openapi(server):
    assert httpx.get(server + "/healthz").json()["status"] == "ok"
    assert httpx.get(server + "/readyz").json() == {"status": "ready"}
    m = httpx.get(server + "/metrics")
    assert m.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert 'visionscale_http_requests_total{endpoint="/healthz",method="GET",status="200"}' in m.text
    assert "# TYPE visionscale_http_request_duration_seconds histogram" in m.text
    assert "process_resident_memory_bytes" in m.text
    spec = httpx.get(server + "/openapi.json").json()
    assert {"/v1/anomaly/score", "/v1/face/enroll", "/healthz", "/metrics"} <= set(spec["paths"])
    assert httpx.get(server + "/docs").status_code == 200
    info = httpx.get(server + "/v1/info").json()
    assert info["anomaly"]["model"] == "patchcore_tiny" and info["face"] is None


# -- a service plugged in through the interface: timeouts, overload, bugs --------------------

class _SlowService:
    kind = "fake"
    pixel_threshold, pixel_span, image_threshold = 0.5, 1.0, 0.5
    info = {"source": "fake", "image_size": [8, 8]}

    def __init__(self):
        self.delay = 0.0
        self.crash = False

    def score(self, paths):
        time.sleep(self.delay)
        if self.crash:
            raise KeyError("a bug")
        return [{"score": 0.7, "normalized_score": 0.7, "label": "anomalous", "anomaly_map": np.zeros((8, 8), np.float32),
                 "regions": [], "image_size": (8, 8)} for _ in paths]


def test_timeouts_overload_and_bugs_are_json(demo_images):
    from visionscale.serve import ServeLimits, create_app

    svc = _SlowService()
    app = create_app(svc, limits=ServeLimits(timeout_s=0.3, max_queue=1, max_batch=1, max_wait_ms=0))
    good = ("a.png", demo_images[0].read_bytes(), "image/png")
    with running(app) as base:
        assert _post(base, "/v1/anomaly/score", files={"file": good}).json()["score"] == 0.7
        svc.delay = 1.0
        _error(_post(base, "/v1/anomaly/score", files={"file": good}), 504, "timeout")
        time.sleep(1.2)
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(
            _post(base, "/v1/anomaly/score", files={"file": good}))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        # one runs, one waits, the rest find the queue full: 503 or 504, never a hang
        assert {r.status_code for r in answers} <= {503, 504} and 503 in {r.status_code for r in answers}
        time.sleep(1.2)
        svc.delay, svc.crash = 0.0, True
        _error(_post(base, "/v1/anomaly/score", files={"file": good}), 500, "internal")  # a bug, said as one


# -- faces -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def face_server(tmp_path_factory):
    from visionscale.serve import create_app

    db = tmp_path_factory.mktemp("gallery") / "people.db"
    app = create_app("face", gallery=db, api_key="s3cret")
    with running(app) as base:
        yield base, db


def test_faces_detect_enroll_identify_verify(face_server, demo_images):
    base, db = face_server
    astro = _png(FACE_DATA / "astronaut.png")
    flipped = _png(FACE_DATA / "astronaut_flipped.png")
    key = {"X-API-Key": "s3cret"}
    det = _post(base, "/v1/face/detect", files={"file": astro}).json()
    assert det["image_size"] == [512, 512] and len(det["faces"]) == 1 and det["faces"][0]["usable"]
    _error(_post(base, "/v1/face/enroll", data={"name": "eileen"}, files={"files": astro}), 401, "unauthorized")
    _error(_post(base, "/v1/face/enroll", data={"name": "eileen"}, files={"files": astro},
                 headers={"X-API-Key": "wrong"}), 401)
    r = _post(base, "/v1/face/enroll", data={"name": "eileen"}, files={"files": astro}, headers=key)
    assert r.status_code == 200 and r.json()["added"] == 1, r.text
    _error(_post(base, "/v1/face/enroll", data={"name": "eileen", "if_exists": "fail"}, files={"files": astro},
                 headers=key), 409, "already_enrolled")
    _error(_post(base, "/v1/face/enroll", data={"name": "brick"}, files={"files": _png(demo_images[0])},
                 headers=key), 422, "no_face")
    _error(_post(base, "/v1/face/enroll", data={"name": " padded"}, files={"files": astro}, headers=key), 422,
           "invalid_name")
    ident = _post(base, "/v1/face/identify", files={"file": flipped}).json()
    assert [f["name"] for f in ident["faces"]] == ["eileen"] and ident["faces"][0]["distance"] < ident["threshold"]
    v = _post(base, "/v1/face/verify", files={"image_a": astro, "image_b": flipped}).json()
    assert v["same"] is True and v["distance"] < v["threshold"] == 0.6
    v = _post(base, "/v1/face/verify", data={"name": "eileen"}, files={"image_a": flipped}).json()
    assert v["same"] is True and v["name"] == "eileen"
    _error(_post(base, "/v1/face/verify", data={"name": "nobody"}, files={"image_a": flipped}), 404, "unknown_identity")
    _error(_post(base, "/v1/face/verify", files={"image_a": flipped}), 422)
    err = _error(_post(base, "/v1/face/verify", files={"image_a": astro, "image_b": _png(demo_images[0])}), 422,
                 "no_face")
    assert err["field"] == "image_b"
    _error(httpx.delete(base + "/v1/face/gallery/nobody", headers=key), 404, "unknown_identity")
    _error(httpx.delete(base + "/v1/face/gallery/eileen"), 401)
    _error(_post(base, "/v1/anomaly/score", files={"file": astro}), 404, "not_served")


def test_concurrent_enrolls_of_one_name_all_land(face_server):
    from visionscale.face.gallery import Gallery

    base, db = face_server
    key = {"X-API-Key": "s3cret"}
    half = _png(FACE_DATA / "astronaut_half.png")
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(_post(
        base, "/v1/face/enroll", data={"name": "twin"}, files={"files": half}, headers=key))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [r.status_code for r in answers] == [200] * 4, [r.text for r in answers]
    # serialised, one transaction each: every enrolment stored, none lost or doubled
    assert sorted(r.json()["embeddings"] for r in answers) == [1, 2, 3, 4]
    people = {p["name"]: p["embeddings"] for p in httpx.get(base + "/v1/face/gallery").json()["people"]}
    assert people["twin"] == 4
    with Gallery(db, read_only=True) as g:
        assert len(g.embeddings_of("twin")) == 4
    r = httpx.delete(base + "/v1/face/gallery/twin", headers=key)
    assert r.status_code == 200 and r.json()["removed_embeddings"] == 4


# -- the command ------------------------------------------------------------------------------

def test_cli_serve_answers_over_http(tiny_run, demo_images):
    port = free_port()
    with serving_process(["-m", "visionscale.cli.main", "serve", str(tiny_run), "--port", str(port),
                          "--device", "cpu", "--log-level", "warning"], port) as base:
        r = _post(base, "/v1/anomaly/score", files={"file": _png(demo_images[0])})
        assert r.status_code == 200 and r.json()["label"] in ("normal", "anomalous")
        assert "visionscale" in httpx.get(base + "/").text


def test_cli_serve_refuses_a_bad_target_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "visionscale.cli.main", "serve", str(tmp_path / "missing")],
                       env={**__import__("os").environ,
                            "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: run folder not found"), r.stderr
