"""The same anomaly-scoring endpoint as ``visionscale serve RUN`` (POST /v1/anomaly/score with an
uploaded image -> score, label, normalized score, regions), served by LitServe instead of our
FastAPI app, for the framework comparison in ``benchmarks/bench_serve.py --framework litserve``.

Not part of the package: LitServe is not a dependency (``pip install litserve`` to run this).
It scores with the same :class:`visionscale.serve.services.RunAnomalyService` as our server, so
the two differ only in the serving layer: LitServe runs the model in a separate worker process
fed through queues, batches with ``max_batch_size``/``batch_timeout``, and does none of our
server's upload checks (size limits, pixel limits from the header, structured errors).

Usage: python benchmarks/litserve_anomaly.py RUN --port P [--max-batch N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import litserve as ls  # noqa: E402


class AnomalyAPI(ls.LitAPI):
    def __init__(self, run: str, **kwargs):
        super().__init__(api_path="/v1/anomaly/score", **kwargs)
        self.run = run

    def setup(self, device):
        import torch

        from visionscale.serve.services import load_anomaly_service

        torch.set_num_threads(1)  # as `visionscale serve` on this 2-core box
        self.svc = load_anomaly_service(self.run, device="cpu")
        self.tmp = Path(tempfile.mkdtemp(prefix="litserve-"))

    def decode_request(self, request):
        upload = request["file"]
        data = upload.file.read() if hasattr(upload, "file") else bytes(upload)
        fd, name = tempfile.mkstemp(suffix=Path(getattr(upload, "filename", "x.png") or "x.png").suffix,
                                    dir=self.tmp)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return Path(name)

    def batch(self, inputs):
        return list(inputs)

    def predict(self, paths):
        single = isinstance(paths, Path)  # LitServe passes one input, unbatched, when max_batch_size is 1
        batch = [paths] if single else paths
        try:
            out = self.svc.score(batch)
        finally:
            for p in batch:
                p.unlink(missing_ok=True)
        return out[0] if single else out

    def unbatch(self, output):
        return list(output)

    def encode_response(self, rec):
        if isinstance(rec, Exception):
            from fastapi import HTTPException

            raise HTTPException(400, str(rec))
        return {"score": rec["score"], "normalized_score": rec["normalized_score"], "label": rec["label"],
                "image_size": list(rec["image_size"]), "regions": rec["regions"],
                "threshold": getattr(self.svc, "image_threshold", None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--max-batch", type=int, default=1)
    ap.add_argument("--batch-timeout", type=float, default=0.002, help="seconds (our server's --max-wait-ms 2)")
    args = ap.parse_args()
    api = AnomalyAPI(args.run, max_batch_size=args.max_batch,
                     batch_timeout=args.batch_timeout if args.max_batch > 1 else 0.0)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=30)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
