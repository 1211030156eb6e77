"""Benchmark the edgefleet runtime against raw onnxruntime, other HTTP servers and KServe's model server.

One run, same model (tests/fixtures/models/digits_cnn.onnx, batch 1), same machine, 1 intra-op
thread everywhere, servers one after another:

* raw        onnxruntime ``session.run`` in-process (the floor); at concurrency > 1 the better of one session
             shared by the threads and one session per thread (its best configuration, chosen per round)
* edgefleet  ``edgefleet-runtime serve`` over HTTP (JSON body; binary extension too) and over gRPC
             (``inference.GRPCInferenceService/ModelInfer`` with raw_input_contents)
* edgefleet-wN        ``serve --workers N`` (``--workers 1 2`` by default: rows for 1 process and 2 workers)
* grpcio-sync-floor / grpcio-aio-floor   grpcio's sync and asyncio servers answering ModelInfer with a canned
             response (no decoding, no inference): what gRPC costs through grpcio before any work
* granian / uvicorn   the same edgefleet App behind granian (WSGI, Rust HTTP) and uvicorn+httptools
             (ASGI): the HTTP layer is the only difference (the "harden our server or use a library" question)
* edgefleet@REV       ``--baseline-rev REV``: the runtime package at git revision REV, REST and gRPC (before/after)
* edgefleet+monitoring  ``--monitoring``: the same server with fleet monitoring on (confidence, class counts,
             drift against a bench reference, hard examples sampled at 1%); REST only
* kserve     KServe's Python model server (``kserve.Model`` wrapping the same onnxruntime session)

KServe lives in its own venv so it cannot disturb the project's dependencies: by default
``~/.cache/edgefleet-bench/kserve-venv``, created on first use with
``python -m venv`` + ``pip install kserve onnxruntime numpy`` (``--kserve-venv`` to choose another,
``--skip-kserve`` to leave it out).

Clients (the ``client`` column says which drove each row): HTTP rows are driven by ``benchmarks/loadgen``,
a small Go program (standard library only; keep-alive connections, one request in flight on each, each on
its own OS thread with a blocking socket: a write and a read system call per request, no netpoller hop in
the measured latency, which is kept in nanoseconds; hey prints seconds to 4 decimals, too coarse for a
0.1 ms goal). gRPC rows use the same program's minimal HTTP/2 client (``-grpc``, same cost model: one
connection per client thread, a write and a read per call), so REST and gRPC are compared, not their clients
(grpcio's Python client costs about 3x the CPU per call); ``NAME/py`` gRPC rows repeat them with grpcio.
It is built with ``go build`` on first use and cached as
``$EDGEFLEET_CACHE/bin/edgefleet-loadgen-<source hash>``. ``--client python`` (or no Go) uses the Python
raw-socket client threads instead; rows ``NAME/py`` repeat edgefleet JSON and KServe with it as a cross-check
(``--no-cross-check`` leaves them out). The grpcio client sends pre-serialized bytes on one channel per
thread. ``client cpu`` is the client's CPU per request in the measured window.

    python benchmarks/runtime.py [--seconds 4] [--rounds 3] [--baseline-rev fd1974e] [--json PATH]

Every case runs ``--rounds`` times (interleaved); the table shows medians and each goal is the median of
the per-round ratios (each against that round's raw onnxruntime / KServe), so a busy neighbour skews
one round, not the result. Prints p50/p95 latency, throughput at concurrency 1 and 8, the server's CPU
time per request (user + system of the server's processes during the measured window: steadier than
latency on a shared machine), ratios to raw onnxruntime and KServe, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
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


# The same edgefleet App (model slot, OIP routes, metrics) behind another HTTP server.
ALT_SERVER = r"""
import argparse, hashlib, os, sys
from edgefleet_runtime.app import App, Metrics, ModelSlot


def make_app():
    path = os.environ["EF_MODEL"]
    metrics = Metrics()
    slot = ModelSlot("digits", metrics, threads=1)
    slot.load(path, "sha256:" + hashlib.sha256(open(path, "rb").read()).hexdigest())
    return App(slot, metrics)


class WSGI:
    def __init__(self, app):
        self.app = app

    def __call__(self, environ, start_response):
        n = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(n) if n else b""
        headers = {k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")}
        status, hdrs, out = self.app(environ["REQUEST_METHOD"], environ["PATH_INFO"], headers, body)
        start_response(f"{status} -", [*hdrs, ("Content-Length", str(len(out)))])
        return [out]


class ASGI:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            msg = await receive()
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        status, hdrs, out = self.app(scope["method"], scope["path"], headers, b"".join(chunks))
        head = [(k.encode(), v.encode()) for k, v in hdrs] + [(b"content-length", str(len(out)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": head})
        await send({"type": "http.response.body", "body": out})


def make_wsgi():
    return WSGI(make_app())


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("kind")
    p.add_argument("port", type=int)
    a = p.parse_args()
    if a.kind == "uvicorn":
        import uvicorn

        uvicorn.run(ASGI(make_app()), host="127.0.0.1", port=a.port, http="httptools", loop="asyncio",
                    log_level="warning", access_log=False)
    else:
        from pathlib import Path
        from granian.constants import Interfaces
        from granian.server import Server

        Server("alt_server:make_wsgi", factory=True, working_dir=Path(__file__).parent, address="127.0.0.1",
               port=a.port, interface=Interfaces.WSGI, workers=1, blocking_threads=8, log_enabled=False).serve()
"""


# grpcio alone: ModelInfer answered with a canned response (no decoding, no inference). What any server built on
# grpcio pays per call before doing anything: the floor under the edgefleet-grpc rows.
GRPC_FLOOR_SERVER = r"""
import asyncio, sys
from concurrent import futures
import grpc

kind, port, answer = sys.argv[1], int(sys.argv[2]), open(sys.argv[3], "rb").read()
method = {"ModelInfer": grpc.unary_unary_rpc_method_handler(
    (lambda raw, ctx: answer) if kind == "sync" else None, request_deserializer=None, response_serializer=None)}


async def infer(raw, ctx):
    return answer


def health(port):  # the readiness probe the benchmark waits for (HTTP/1.1 200 on the same port + 1)
    import http.server, threading
    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
        def log_message(self, *a):
            pass
    s = http.server.HTTPServer(("127.0.0.1", port), H)
    threading.Thread(target=s.serve_forever, daemon=True).start()


health(port + 1)
if kind == "sync":
    server = grpc.server(futures.ThreadPoolExecutor(20), options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("inference.GRPCInferenceService", method)])
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()
else:
    async def main():
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        handler = grpc.unary_unary_rpc_method_handler(infer, request_deserializer=None, response_serializer=None)
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService", {"ModelInfer": handler})])
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()
    asyncio.run(main())
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


_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]+)", re.IGNORECASE)


class Conn:
    """A keep-alive HTTP/1.1 client on one socket; cheap per request, so that the server gets the CPU."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def roundtrip(self, req: bytes) -> tuple[int, bytes]:
        self.sock.sendall(req)
        buf = self.buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            buf += chunk
        head, rest = buf[:end], buf[end + 4 :]
        status = int(head[9:12])
        m = _CONTENT_LENGTH.search(head)
        length = int(m.group(1)) if m else 0
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


def drive(call_factory, concurrency: int, seconds: float, warmup: float = 0.5, cpu: Callable | None = None) -> dict:
    """Run ``concurrency`` threads, each with its own ``call()`` (from call_factory), for ``seconds``;
    ``cpu()`` (CPU seconds of the server) is read at the start and end of the measured window."""
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
    cpu0 = cpu() if cpu else None
    client0 = time.process_time()
    t0 = time.perf_counter()
    t_end[0] = t0 + seconds
    start_evt.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    client_cpu = time.process_time() - client0
    res = summarize([x for lst in lats for x in lst], elapsed)
    res["errors"] = errors[0]
    if cpu:
        res["server_cpu_us_per_request"] = (cpu() - cpu0) / max(res["requests"], 1) * 1e6
        res["client_cpu_us_per_request"] = client_cpu / max(res["requests"], 1) * 1e6
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


LOADGEN_SOURCE = REPO / "benchmarks" / "loadgen"
PY_CLIENT = "python threads"
GO_CLIENT = "go loadgen"


def loadgen_binary(notes: list[str]) -> Path | None:
    """benchmarks/loadgen built with `go build` (standard library only), cached under $EDGEFLEET_CACHE/bin
    keyed by a hash of its source like the dev cluster's Go tools; None (Python client only) without Go."""
    import hashlib
    import shutil

    from edgefleet_dev.toolchain import cache_dir

    source = b"".join((LOADGEN_SOURCE / f).read_bytes() for f in ("go.mod", "main.go"))
    out = cache_dir() / "bin" / f"edgefleet-loadgen-{hashlib.sha256(source).hexdigest()[:12]}"
    if out.exists():
        return out
    go = shutil.which("go")
    if go is None:
        notes.append("go loadgen: Go is not on PATH; every HTTP row uses the Python client")
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-buildvcs=false"}
    subprocess.run([go, "build", "-trimpath", "-o", str(tmp), "."], cwd=LOADGEN_SOURCE, env=env, check=True)
    tmp.rename(out)
    return out


def drive_loadgen(binary: Path, port: int, req: bytes, check, concurrency: int, seconds: float,
                  cpu: Callable | None = None, warmup: float = 0.5, grpc_method: str | None = None) -> dict:
    """The same measurement as ``drive`` with the Go load generator: ``cpu()`` is read when it says
    "start" and "end"; the first answer goes through ``check``. ``grpc_method``: ``req`` is a protobuf
    message sent as a unary gRPC call of that method (cleartext HTTP/2, one connection per client)."""
    with tempfile.NamedTemporaryFile(prefix="edgefleet-bench-request-") as f:
        f.write(req)
        f.flush()
        proc = subprocess.Popen(
            [str(binary), "-addr", f"127.0.0.1:{port}", "-request", f.name, "-c", str(concurrency),
             "-seconds", str(seconds), "-warmup", str(warmup), *(["-grpc", grpc_method] if grpc_method else [])],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        marks = {}
        for line in proc.stdout:
            word = line.strip().decode()
            if word in ("start", "end"):
                marks[word] = cpu() if cpu else None
            else:
                out = json.loads(line)
        if proc.wait() != 0:
            raise RuntimeError(f"loadgen exited with {proc.returncode}")
    import base64

    check(out["first_status"], base64.b64decode(out["first_body"] or ""))
    res = {k: out[k] for k in ("requests", "p50_ms", "p95_ms", "throughput_rps", "errors")}
    if cpu:
        res["server_cpu_us_per_request"] = (marks["end"] - marks["start"]) / max(res["requests"], 1) * 1e6
    res["client_cpu_us_per_request"] = out["client_cpu_s"] / max(res["requests"], 1) * 1e6
    return res


def drive_http(port: int, req: bytes, check, concurrency: int, args, cpu: Callable, client: str) -> dict:
    """One HTTP row, driven by the Go load generator or the Python threads; the row names its client."""
    if client == GO_CLIENT:
        res = drive_loadgen(args.loadgen, port, req, check, concurrency, args.seconds, cpu)
    else:
        res = drive(http_factory(port, req, check), concurrency, args.seconds, cpu=cpu)
    res["client"] = client
    return res


def http_rows(results: dict, name: str, port: int, req: bytes, check, args, cpu: Callable,
              cross_check: bool = False) -> None:
    """Rows ``name c=N`` with the main client; with ``cross_check`` also ``name/py c=N`` (Python threads)."""
    for c in args.concurrency:
        results[f"{name} c={c}"] = drive_http(port, req, check, c, args, cpu, args.client)
        if cross_check and args.client != PY_CLIENT and args.cross_check:
            results[f"{name}/py c={c}"] = drive_http(port, req, check, c, args, cpu, PY_CLIENT)


GRPC_METHOD = "inference.GRPCInferenceService/ModelInfer"


def grpc_rows(results: dict, name: str, port: int, cases: Cases, args, cpu: Callable) -> None:
    """Rows ``name c=N`` driven by the Go load generator's gRPC client when it is there (the same client as the
    REST rows, so the transports are compared, not the clients), and ``name/py c=N`` by grpcio client threads."""
    req = cases.grpc_request()
    for c in args.concurrency:
        if args.loadgen:
            res = drive_loadgen(args.loadgen, port, req, lambda status, body: cases.check_grpc(body), c,
                                args.seconds, cpu, grpc_method=GRPC_METHOD)
            res["client"] = "go loadgen h2c"
            results[f"{name} c={c}"] = res
        if not args.loadgen or args.cross_check:
            res = drive(grpc_factory(port, req, cases.check_grpc), c, args.seconds, cpu=cpu)
            res["client"] = "grpcio threads"
            results[f"{name}{'/py' if args.loadgen else ''} c={c}"] = res


def grpc_factory(port: int, req: bytes, check):
    """ModelInfer with pre-serialized bytes, one channel (HTTP/2 connection) per client thread."""
    import grpc

    def factory():
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        check(call(req, timeout=10))
        return lambda: call(req, timeout=10)

    return factory


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (granian and ``serve --workers`` run worker processes)."""
    parents = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += [c for c, parent in parents.items() if parent == p]
    return found


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and its descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def tree_rss_mib(pid: int) -> list[float]:
    """VmRSS in MiB of ``pid`` and each descendant, in that order."""
    out = []
    for p in tree(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        out.append(int(m.group(1)) / 1024 if m else 0.0)
    return out


RSS: dict[str, list[list[float]]] = {}  # server -> per round, the RSS of each of its processes after its rows


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


def edgefleet_cmd(model: Path, port: int, *extra: str) -> list[str]:
    digest = "sha256:" + __import__("hashlib").sha256(model.read_bytes()).hexdigest()
    return [sys.executable, "-m", "edgefleet_runtime.cli", "--log-level", "warning", "serve", "--model", str(model),
            "--digest", digest, "--name", "digits", "--host", "127.0.0.1", "--port", str(port), "--threads", "1",
            *extra]  # fmt: skip


def monitoring_args(model: Path) -> tuple[str, ...]:
    """serve flags with every monitoring feature on: drift against a bench reference, a hard-example spool
    (the benchmark's input is unsure enough to reach it with --uncertain-below 1)."""
    from edgefleet_runtime.bench import Options, bench

    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-monitoring-"))
    data = REPO / "examples" / "quickstart" / "digits_eval.npz"
    report = bench(str(model), str(data), opts=Options(threads_n=1, runs=5))
    (work / "reference.json").write_text(json.dumps(report))
    return ("--monitoring", "--uncertain-below", "1", "--drift-reference", str(work / "reference.json"),
            "--hard-examples-dir", str(work / "spool"), "--hard-examples-sample-rate", "0.01")  # fmt: skip


def runtime_at(rev: str) -> Path:
    """The runtime package as it was at git revision ``rev``, unpacked into a temporary directory."""
    out = Path(tempfile.mkdtemp(prefix=f"edgefleet-runtime-{rev}-"))
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "runtime-image/edgefleet_runtime"],
                             check=True, capture_output=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out / "runtime-image"


def serve(cmd: list[str], port: int, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=cwd)
    try:
        wait_ready(port, proc, "/v2/health/ready")
    except Exception:
        stop(proc)
        raise
    return proc


class Cases:
    """Requests and their checks, from one input tensor and the in-process reference output."""

    def __init__(self, x: np.ndarray, expected: np.ndarray):
        self.x, self.expected = x, expected
        self.json = json.dumps(
            {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": x.ravel().tolist()}]}
        ).encode()
        self.bin_head = json.dumps(
            {
                "id": "bench",
                "inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                            "parameters": {"binary_data_size": x.nbytes}}],
                "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
            }
        ).encode()  # fmt: skip

    def json_request(self, port: int) -> bytes:
        return build_request(port, self.json, {})

    def binary_request(self, port: int) -> bytes:
        headers = {"Inference-Header-Content-Length": str(len(self.bin_head))}
        return build_request(port, self.bin_head + self.x.tobytes(), headers)

    def grpc_request(self) -> bytes:
        from tritonclient.grpc import service_pb2

        req = service_pb2.ModelInferRequest(model_name="digits", id="bench")
        req.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
        req.outputs.add(name="logits")
        req.raw_input_contents.append(self.x.tobytes())
        return req.SerializeToString()

    def grpc_answer(self) -> bytes:
        """The ModelInferResponse the server should give (what the floor servers send back as is)."""
        from tritonclient.grpc import service_pb2

        resp = service_pb2.ModelInferResponse(model_name="digits", id="bench")
        resp.outputs.add(name="logits", datatype="FP32", shape=list(self.expected.shape))
        resp.raw_output_contents.append(self.expected.astype("<f4").tobytes())
        return resp.SerializeToString()

    def _close(self, got):
        np.testing.assert_allclose(got, self.expected.ravel(), rtol=1e-4, atol=1e-4)

    def check_json(self, status, body):
        assert status == 200, body[:300]
        self._close(np.array(json.loads(body)["outputs"][0]["data"], dtype=np.float32))

    def check_binary(self, status, body):
        assert status == 200, body[:300]
        self._close(np.frombuffer(body[-40:], dtype="<f4"))

    def check_grpc(self, body: bytes):
        from tritonclient.grpc import service_pb2

        resp = service_pb2.ModelInferResponse.FromString(body)
        self._close(np.frombuffer(resp.raw_output_contents[0], dtype="<f4"))


def run_edgefleet(name, model, cases, args, results, env=None, cwd=None, grpc_too=True, extra=(), cross_check=False):
    """REST rows from a server as the baseline runs it; gRPC rows from a second start with --grpc-port."""
    port = free_port()
    proc = serve(edgefleet_cmd(model, port, *extra), port, env, cwd)
    cpu = lambda: tree_cpu(proc.pid)  # noqa: E731
    try:
        http_rows(results, name, port, cases.json_request(port), cases.check_json, args, cpu, cross_check)
        http_rows(results, f"{name}-binary", port, cases.binary_request(port), cases.check_binary, args, cpu)
        RSS.setdefault(name, []).append(tree_rss_mib(proc.pid))
    finally:
        stop(proc)
    if not grpc_too:
        return
    port, gport = free_port(), free_port()
    proc = serve(edgefleet_cmd(model, port, "--grpc-port", str(gport)), port, env, cwd)
    try:
        grpc_rows(results, f"{name}-grpc", gport, cases, args, lambda: tree_cpu(proc.pid))
    finally:
        stop(proc)


def run_grpc_floor(kind: str, cases: Cases, args, results: dict) -> None:
    """Rows ``grpcio-KIND-floor c=N``: grpcio's sync or asyncio server answering a canned ModelInferResponse."""
    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-grpc-floor-"))
    (work / "server.py").write_text(GRPC_FLOOR_SERVER)
    (work / "answer.bin").write_bytes(cases.grpc_answer())
    port = free_port()
    while port + 1 >= 65536:
        port = free_port()
    proc = subprocess.Popen([sys.executable, str(work / "server.py"), kind, str(port), str(work / "answer.bin")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(port + 1, proc, "/")
        grpc_rows(results, f"grpcio-{kind}-floor", port, cases, args, lambda: tree_cpu(proc.pid))
    finally:
        stop(proc)


def run_alt(kind, model, cases, args, results, notes):
    missing = [m for m in {"granian": ["granian"], "uvicorn": ["uvicorn", "httptools"]}[kind] if not _has(m)]
    if missing:
        notes.append(f"{kind}: not installed ({', '.join(missing)}); pip install -e '.[dev]'")
        return
    port = free_port()
    script = Path(tempfile.mkdtemp()) / "alt_server.py"
    script.write_text(ALT_SERVER)
    env = {**os.environ, "EF_MODEL": str(model), "PYTHONPATH": str(REPO / "runtime-image")}
    proc = serve([sys.executable, str(script), kind, str(port)], port, env)
    try:
        http_rows(results, kind, port, cases.json_request(port), cases.check_json, args, lambda: tree_cpu(proc.pid))
    finally:
        stop(proc)


def run_kserve(model, cases, args, results, notes):
    try:
        py = ensure_kserve_venv(args.kserve_venv)
    except (subprocess.CalledProcessError, OSError) as e:
        notes.append(f"kserve: could not create its venv ({e}); rows left out")
        return
    port = free_port()
    script = Path(tempfile.mkdtemp()) / "kserve_digits.py"
    script.write_text(KSERVE_SERVER)
    proc = serve([str(py), str(script), "--model_path", str(model), "--port", str(port)], port)
    try:
        http_rows(results, "kserve", port, cases.json_request(port), cases.check_json, args,
                  lambda: tree_cpu(proc.pid), cross_check=True)
    finally:
        stop(proc)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


RAW_SHARED = "in-process, 1 session, c threads"
RAW_OWN = "in-process, 1 session per thread"
CONFIGS = {  # what each row runs (all: 1 intra-op thread per inference)
    "edgefleet": "serve, 1 process, thread per connection",
    "edgefleet-binary": "serve, 1 process, thread per connection",
    "edgefleet-grpc": "serve --grpc-port",
    "granian": "same App, granian WSGI, 1 worker, 8 threads",
    "uvicorn": "same App, uvicorn+httptools, 1 worker",
    "kserve": "kserve ModelServer, workers=1",
    "grpcio-sync-floor": "grpcio sync server, 20 threads, canned answer (no decode, no inference)",
    "grpcio-aio-floor": "grpcio asyncio server, canned answer (no decode, no inference)",
}


def config_of(name: str, r: dict) -> str:
    server = name.rsplit(" ", 1)[0].removesuffix("/py")
    if "config" in r:
        return r["config"]
    workers = re.match(r"edgefleet-w([0-9]+)", server)
    if workers:
        return f"serve --workers {workers.group(1)}, SO_REUSEPORT, thread per connection"
    if server.startswith("edgefleet@"):
        return "serve at git rev " + server[len("edgefleet@") :].split("-")[0]
    return CONFIGS.get(server, CONFIGS.get(server.split("+")[0], ""))


def print_table(results: dict, model: Path, args, notes: list[str]) -> None:
    print(
        f"\nmodel {model.relative_to(REPO) if model.is_relative_to(REPO) else model}, batch 1, "
        f"{args.seconds:g} s per case, medians of {args.rounds} rounds, {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'case':<26}{'p50 ms':>8}{'p95 ms':>8}{'req/s':>9}{'p50-raw':>9}{'% raw':>7}{'vs kserve':>10}"
          f"{'cpu us/req':>11}{'client cpu':>11}{'errors':>7}  {'client':<15} configuration")  # fmt: skip
    for name, r in results.items():
        server, c = name.rsplit(" ", 1)
        raw = results[f"raw {c}"]
        ks = results.get(f"kserve {c}")  # the same client's KServe row
        is_raw = server == "raw"
        vs = f"{r['throughput_rps'] / ks['throughput_rps']:.2f}x" if ks and not is_raw else ""
        over = "" if is_raw else f"{r['p50_ms'] - raw['p50_ms']:+.3f}"
        share = "" if is_raw else f"{100 * r['throughput_rps'] / raw['throughput_rps']:.1f}"
        cpu = f"{r['server_cpu_us_per_request']:.0f}" if "server_cpu_us_per_request" in r else ""
        client_cpu = f"{r['client_cpu_us_per_request']:.0f}" if "client_cpu_us_per_request" in r else ""
        print(f"{name:<26}{r['p50_ms']:>8.3f}{r['p95_ms']:>8.3f}{r['throughput_rps']:>9.0f}{over:>9}{share:>7}"
              f"{vs:>10}{cpu:>11}{client_cpu:>11}{r['errors']:>7}  {r.get('client', ''):<15} "
              f"{config_of(name, r)}")  # fmt: skip
    for n in dict.fromkeys(notes):
        print(f"note: {n}")
    for server, rounds in RSS.items():
        last = rounds[-1]
        print(f"RSS {server}: {sum(last):.0f} MiB in {len(last)} processes ({', '.join(f'{x:.0f}' for x in last)})")


def round_ratios(results: dict) -> dict:
    """The issue's goal quantities from one round's numbers, for each edgefleet REST server in the round
    (``edgefleet``: 1 process; ``edgefleet-wN``: N workers), each against the same-client KServe row."""
    raw1, raw8 = results["raw c=1"], results["raw c=8"]
    out = {}
    for server in [k[: -len(" c=8")] for k in results if re.fullmatch(r"edgefleet(-w[0-9]+)? c=8", k)]:
        ef1, ef8 = results[f"{server} c=1"], results[f"{server} c=8"]
        tag = "" if server == "edgefleet" else f"[{server}]"
        out["json_p50_overhead_ms" + tag] = ef1["p50_ms"] - raw1["p50_ms"]
        out["binary_p50_overhead_ms" + tag] = results[f"{server}-binary c=1"]["p50_ms"] - raw1["p50_ms"]
        out["c8_throughput_share_of_raw" + tag] = ef8["throughput_rps"] / raw8["throughput_rps"]
        if "kserve c=8" in results:
            out["c8_throughput_over_kserve" + tag] = ef8["throughput_rps"] / results["kserve c=8"]["throughput_rps"]
    if "edgefleet-grpc c=1" in results:  # the same client as the REST rows (go loadgen, else Python threads)
        rest1, grpc1 = results["edgefleet c=1"], results["edgefleet-grpc c=1"]
        out["grpc_p50_over_rest"] = grpc1["p50_ms"] / rest1["p50_ms"]
        out["grpc_p50_overhead_over_rest"] = (grpc1["p50_ms"] - raw1["p50_ms"]) / (rest1["p50_ms"] - raw1["p50_ms"])
        out["grpc_c8_throughput_over_rest"] = (results["edgefleet-grpc c=8"]["throughput_rps"]
                                               / results["edgefleet c=8"]["throughput_rps"])
    if "edgefleet+monitoring c=1" in results:
        monitored = results["edgefleet+monitoring c=1"]["p50_ms"]
        out["monitoring_p50_overhead_ms"] = monitored - results["edgefleet c=1"]["p50_ms"]
    return out


TARGETS = {"json_p50_overhead_ms": ("<=", 0.1), "binary_p50_overhead_ms": ("<=", 0.1),
           "c8_throughput_share_of_raw": (">=", 0.25), "c8_throughput_over_kserve": (">=", 4.0),
           "monitoring_p50_overhead_ms": ("<=", 0.02), "grpc_p50_over_rest": ("<=", 1.5),
           "grpc_p50_overhead_over_rest": ("<=", 1.5), "grpc_c8_throughput_over_rest": (">=", 1.0)}  # fmt: skip


def goals(rounds: list[dict]) -> dict:
    """Median over rounds of each goal quantity (each round's ratio uses that round's own baseline)."""
    per_round = [round_ratios(r) for r in rounds]
    out = {}
    for k in per_round[0]:
        v = statistics.median(r[k] for r in per_round if k in r)
        op, target = TARGETS[k.split("[")[0]]
        out[k] = {"value": v, "rounds": [r.get(k) for r in per_round], "goal": f"{op} {target}",
                  "met": v <= target if op == "<=" else v >= target}  # fmt: skip
    return out


def median_results(rounds: list[dict]) -> dict:
    """Per case, the median of each number over the rounds (errors: the sum)."""
    out = {}
    for case in rounds[0]:
        runs = [r[case] for r in rounds if case in r]
        out[case] = {k: statistics.median(run[k] for run in runs) for k in runs[0] if k not in ("config", "client")}
        if "client" in runs[0]:
            out[case]["client"] = runs[0]["client"]
        out[case]["errors"] = sum(run["errors"] for run in runs)  # every error counts, not the median
        configs = sorted({run["config"] for run in runs if "config" in run})
        if configs:
            out[case]["config"] = " / ".join(configs)  # raw: the best configuration of each round
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=4.0, help="measured seconds per case")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=3, help="repeat every case; the table shows medians")
    ap.add_argument("--kserve-venv", type=Path, default=CACHE / "kserve-venv")
    ap.add_argument("--skip-kserve", action="store_true")
    ap.add_argument("--skip-alternatives", action="store_true",
                    help="leave out granian, uvicorn and the grpcio floor rows")
    ap.add_argument("--baseline-rev", help="also run the runtime package of this git revision (e.g. fd1974e)")
    ap.add_argument("--monitoring", action="store_true",
                    help="also run edgefleet+monitoring: --monitoring, a drift reference and a hard-example spool")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                    help="edgefleet REST rows for each `serve --workers N` (rows edgefleet-wN for N > 1)")
    ap.add_argument("--client", choices=("go", "python"), default="go",
                    help="HTTP client of the rows: the Go load generator (benchmarks/loadgen) or Python threads")
    ap.add_argument("--no-cross-check", dest="cross_check", action="store_false",
                    help="leave out the /py rows (edgefleet JSON and KServe again with the Python client)")
    ap.add_argument("--json", type=Path, default=CACHE / "runtime-benchmark.json")
    args = ap.parse_args()
    if 1 not in args.concurrency or 8 not in args.concurrency:
        ap.error("--concurrency must include 1 and 8 (the goals are stated at those)")

    model = model_path()
    x = np.random.default_rng(0).uniform(0, 16, (1, 1, 8, 8)).astype(np.float32)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    cases = Cases(x, sess.run(["logits"], {"input": x})[0])
    notes: list[str] = []
    args.loadgen = loadgen_binary(notes) if args.client == "go" else None
    args.client = GO_CLIENT if args.loadgen else PY_CLIENT
    baseline = runtime_at(args.baseline_rev) if args.baseline_rev else None
    monitoring = monitoring_args(model) if args.monitoring else ()

    def raw_factory(own_session: bool = False):
        run = (ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"]) if own_session else sess).run
        feeds = {"input": x}
        return lambda: run(["logits"], feeds)

    def raw(c: int) -> dict:
        """Raw onnxruntime at its best at concurrency c: one shared session, or one session per thread."""
        shared = drive(raw_factory, c, args.seconds)
        shared["config"], shared["client"] = RAW_SHARED, "in-process"
        if c == 1:
            return shared
        own = drive(lambda: raw_factory(own_session=True), c, args.seconds)
        own["config"], own["client"] = RAW_OWN, "in-process"
        return max(shared, own, key=lambda r: r["throughput_rps"])

    rounds = []
    for i in range(args.rounds):
        print(f"round {i + 1} of {args.rounds} ...", file=sys.stderr, flush=True)
        results: dict[str, dict] = {}
        for c in args.concurrency:
            results[f"raw c={c}"] = raw(c)
        for w in args.workers:
            if w == 1:
                run_edgefleet("edgefleet", model, cases, args, results, cross_check=True)
            else:
                run_edgefleet(f"edgefleet-w{w}", model, cases, args, results, grpc_too=False,
                              extra=("--workers", str(w)), cross_check=True)
        if monitoring:
            run_edgefleet("edgefleet+monitoring", model, cases, args, results, grpc_too=False, extra=monitoring)
        if args.baseline_rev:
            env = {**os.environ, "PYTHONPATH": str(baseline)}
            run_edgefleet(f"edgefleet@{args.baseline_rev}", model, cases, args, results, env, baseline)
        if not args.skip_alternatives:
            for kind in ("granian", "uvicorn"):
                run_alt(kind, model, cases, args, results, notes if i == 0 else [])
            for kind in ("sync", "aio"):
                run_grpc_floor(kind, cases, args, results)
        if not args.skip_kserve:
            run_kserve(model, cases, args, results, notes)
        rounds.append(results)
    if args.skip_kserve:
        notes.append("kserve: skipped (--skip-kserve)")
    checked = goals(rounds)
    results = median_results(rounds)
    print_table(results, model, args, notes)
    print("\ngoals: " + ", ".join(f"{k} {v['value']:.3f} ({v['goal']}: {'met' if v['met'] else 'MISSED'})"
                                  for k, v in checked.items()))  # fmt: skip
    out = {
        "model": str(model),
        "seconds": args.seconds,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "rounds": rounds,
        "median": results,
        "goals": checked,
        "notes": notes,
        "rss_mib": RSS,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
