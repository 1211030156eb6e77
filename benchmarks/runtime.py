"""Benchmark the edgefleet runtime against raw onnxruntime and KServe's Python model server.

One run, same model (tests/fixtures/models/digits_cnn.onnx, batch 1), same machine, 1 intra-op
thread everywhere:

* raw      onnxruntime ``session.run`` in-process (the floor)
* edgefleet ``edgefleet-runtime serve`` over HTTP (JSON body; binary extension too)
* kserve   KServe's Python model server (``kserve.Model`` wrapping the same onnxruntime session)

KServe lives in its own venv so it cannot disturb the project's dependencies: by default
``~/.cache/edgefleet-bench/kserve-venv``, created on first use with
``python -m venv`` + ``pip install kserve onnxruntime numpy`` (``--kserve-venv`` to choose another,
``--skip-kserve`` to leave it out). Every client is the same raw-socket keep-alive client.

    python benchmarks/runtime.py [--seconds 4] [--json PATH]

Prints p50/p95 latency and throughput at concurrency 1 and 8, with ratios, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgefleet-bench"

KSERVE_SERVER = r"""
import argparse, onnxruntime as ort
from kserve import Model, ModelServer, InferRequest, InferResponse, InferOutput

class Digits(Model):
    def __init__(self, name, path):
        super().__init__(name)
        self.path = path
        self.load()

    def load(self):
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        self.sess = ort.InferenceSession(self.path, so, providers=["CPUExecutionProvider"])
        self.ready = True
        return True

    def predict(self, payload: InferRequest, headers=None, response_headers=None):
        x = payload.inputs[0].as_numpy()
        y = self.sess.run(["logits"], {"input": x})[0]
        out = InferOutput(name="logits", shape=list(y.shape), datatype="FP32")
        out.set_data_from_numpy(y, binary_data=False)
        return InferResponse(model_name=self.name, infer_outputs=[out], response_id=payload.id or "bench")

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--model_path")
    p.add_argument("--port", type=int)
    a, _ = p.parse_known_args()
    ModelServer(http_port=a.port, grpc_port=a.port + 1, workers=1, enable_grpc=False,
                enable_latency_logging=False, access_log_format=None).start([Digits("digits", a.model_path)])
"""


def model_path() -> Path:
    p = REPO / "tests" / "fixtures" / "models" / "digits_cnn.onnx"
    if p.exists():
        return p
    sys.path.insert(0, str(REPO / "tests" / "runtime"))
    import models  # the same fallback CNN the tests build

    return models.build_cnn(CACHE / "digits_fallback.onnx")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- client
def build_request(port: int, payload: bytes, headers: dict[str, str]) -> bytes:
    head = f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head += f"Content-Length: {len(payload)}\r\n\r\n"
    return head.encode() + payload


class Conn:
    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def roundtrip(self, req: bytes) -> tuple[int, bytes]:
        self.sock.sendall(req)
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buf += chunk
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v)
        while len(rest) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            rest += chunk
        body, self.buf = rest[:length], rest[length:]
        return status, body


def summarize(lat: list[float], seconds: float) -> dict:
    lat_ms = sorted(x * 1000 for x in lat)
    return {
        "requests": len(lat_ms),
        "p50_ms": statistics.median(lat_ms),
        "p95_ms": lat_ms[int(0.95 * (len(lat_ms) - 1))],
        "throughput_rps": len(lat_ms) / seconds,
    }


def drive(call_factory, concurrency: int, seconds: float, warmup: float = 0.5) -> dict:
    """Run ``concurrency`` threads, each with its own ``call()`` (from call_factory), for ``seconds``."""
    lats: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0]
    start_evt = threading.Event()
    t_end = [0.0]

    def worker(i):
        call = call_factory()
        warm_end = time.perf_counter() + warmup
        while time.perf_counter() < warm_end:
            call()
        start_evt.wait()
        out = lats[i]
        pc = time.perf_counter
        while True:
            t0 = pc()
            if t0 >= t_end[0]:
                return
            try:
                call()
            except Exception:  # noqa: BLE001 - counted, must be zero
                errors[0] += 1
                call = call_factory()
                continue
            out.append(pc() - t0)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    time.sleep(warmup + 0.2)
    t0 = time.perf_counter()
    t_end[0] = t0 + seconds
    start_evt.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    res = summarize([x for lst in lats for x in lst], elapsed)
    res["errors"] = errors[0]
    return res


def http_factory(port: int, req: bytes, check):
    def factory():
        conn = Conn(port)

        def call():
            status, body = conn.roundtrip(req)
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {body[:200]!r}")

        status, body = conn.roundtrip(req)
        check(status, body)
        return call

    return factory


# ---------------------------------------------------------------------------------------------- servers
def wait_ready(port: int, proc: subprocess.Popen, path: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    probe = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(probe)
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server on {port} not ready after {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def ensure_kserve_venv(venv: Path) -> Path:
    py = venv / "bin" / "python"
    if py.exists() and subprocess.run([py, "-c", "import kserve, onnxruntime"], capture_output=True).returncode == 0:
        return py
    print(f"creating KServe venv at {venv} (pip install kserve onnxruntime numpy) ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", "kserve", "onnxruntime", "numpy"], check=True)
    return py


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=4.0, help="measured seconds per case")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--kserve-venv", type=Path, default=CACHE / "kserve-venv")
    ap.add_argument("--skip-kserve", action="store_true")
    ap.add_argument("--json", type=Path, default=CACHE / "runtime-benchmark.json")
    args = ap.parse_args()

    model = model_path()
    x = np.random.default_rng(0).uniform(0, 16, (1, 1, 8, 8)).astype(np.float32)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    expected = sess.run(["logits"], {"input": x})[0]

    payload = json.dumps(
        {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": x.ravel().tolist()}]}
    ).encode()
    bin_head = json.dumps(
        {
            "id": "bench",
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 1, 8, 8],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        }
    ).encode()

    def check_json(status, body):
        assert status == 200, body[:300]
        got = np.array(json.loads(body)["outputs"][0]["data"], dtype=np.float32)
        np.testing.assert_allclose(got, expected.ravel(), rtol=1e-4, atol=1e-4)

    def check_binary(status, body):
        assert status == 200, body[:300]
        got = np.frombuffer(body[-40:], dtype="<f4")
        np.testing.assert_allclose(got, expected.ravel(), rtol=1e-4, atol=1e-4)

    results: dict[str, dict] = {}

    def raw_factory():
        run = sess.run
        feeds = {"input": x}
        return lambda: run(["logits"], feeds)

    for c in args.concurrency:
        results[f"raw c={c}"] = drive(raw_factory, c, args.seconds)

    servers = []
    port = free_port()
    ours = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgefleet_runtime.cli",
            "--log-level",
            "warning",
            "serve",
            "--model",
            str(model),
            "--digest",
            "sha256:" + __import__("hashlib").sha256(model.read_bytes()).hexdigest(),
            "--name",
            "digits",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--threads",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    servers.append(ours)
    try:
        wait_ready(port, ours, "/v2/health/ready")
        req = build_request(port, payload, {})
        breq = build_request(port, bin_head + x.tobytes(), {"Inference-Header-Content-Length": str(len(bin_head))})
        for c in args.concurrency:
            results[f"edgefleet c={c}"] = drive(http_factory(port, req, check_json), c, args.seconds)
            results[f"edgefleet-binary c={c}"] = drive(http_factory(port, breq, check_binary), c, args.seconds)
        stop(ours)

        if not args.skip_kserve:
            py = ensure_kserve_venv(args.kserve_venv)
            kport = free_port()
            script = Path(tempfile.mkdtemp()) / "kserve_digits.py"
            script.write_text(KSERVE_SERVER)
            ks = subprocess.Popen(
                [str(py), str(script), "--model_path", str(model), "--port", str(kport)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            servers.append(ks)
            wait_ready(kport, ks, "/v2/health/ready")
            kreq = build_request(kport, payload, {})
            for c in args.concurrency:
                results[f"kserve c={c}"] = drive(http_factory(kport, kreq, check_json), c, args.seconds)
            stop(ks)
    finally:
        for p in servers:
            stop(p)

    ratios = {}
    for c in args.concurrency:
        raw, ef = results[f"raw c={c}"], results[f"edgefleet c={c}"]
        ratios[f"c={c}"] = {
            "edgefleet_p50_overhead_ms": ef["p50_ms"] - raw["p50_ms"],
            "edgefleet_binary_p50_overhead_ms": results[f"edgefleet-binary c={c}"]["p50_ms"] - raw["p50_ms"],
        }
        if f"kserve c={c}" in results:
            ks = results[f"kserve c={c}"]
            ratios[f"c={c}"]["kserve_p50_overhead_ms"] = ks["p50_ms"] - raw["p50_ms"]
            ratios[f"c={c}"]["throughput_edgefleet_over_kserve"] = ef["throughput_rps"] / ks["throughput_rps"]

    print(
        f"\nmodel {model.relative_to(REPO) if model.is_relative_to(REPO) else model}, batch 1, "
        f"{args.seconds:g} s per case, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
    )
    print(f"{'case':<22}{'p50 ms':>9}{'p95 ms':>9}{'req/s':>10}{'p50 - raw':>11}{'vs kserve':>11}{'errors':>8}")
    for name, r in results.items():
        server, c = name.rsplit(" ", 1)
        raw = results[f"raw {c}"]
        ks = results.get(f"kserve {c}")
        vs = f"{r['throughput_rps'] / ks['throughput_rps']:.2f}x" if ks and server != "raw" else ""
        over = f"{r['p50_ms'] - raw['p50_ms']:+.3f}" if server != "raw" else ""
        print(
            f"{name:<22}{r['p50_ms']:>9.3f}{r['p95_ms']:>9.3f}{r['throughput_rps']:>10.0f}{over:>11}{vs:>11}"
            f"{r['errors']:>8}"
        )
    out = {
        "model": str(model),
        "seconds": args.seconds,
        "cpus": os.cpu_count(),
        "results": results,
        "ratios": ratios,
        "goals": {"p50_overhead_ms_max": 0.5, "throughput_vs_kserve_min": 1.5},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
