"""``serve --workers N``: processes sharing the port, metrics summed over them, per-worker limits, gRPC in one
worker, signals passed to all, refused with state that lives in one process."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
from conftest import make_cache
from edgefleet_runtime.cli import EXIT_DIGEST, EXIT_USAGE
from edgefleet_runtime.httpserver import Limits
from prometheus_client import CollectorRegistry, generate_latest, multiprocess

X = np.random.default_rng(3).uniform(0, 16, (1, 1, 8, 8)).astype(np.float32)
BODY = json.dumps(
    {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": X.ravel().tolist()}]}
).encode()
INFER = "/v2/models/digits/infer"


def workers_of(s) -> list[psutil.Process]:
    """The two workers of ``s``, once both listen (the server is ready as soon as one does)."""
    deadline = time.monotonic() + 15
    while not (len(children := psutil.Process(s.proc.pid).children()) == 2
               and all(listening(p, s.port) for p in children)):  # fmt: skip
        assert time.monotonic() < deadline, s.logs()
        time.sleep(0.05)
    return children


def listening(proc: psutil.Process, port: int) -> bool:
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in proc.net_connections("tcp"))


def established(proc: psutil.Process, port: int) -> int:
    return sum(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port for c in proc.net_connections("tcp"))


def scrape(s) -> str:
    status, _, body = s.request("GET", "/metrics")
    assert status == 200
    return body.decode()


def sample(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    assert m, f"{name}{labels} not in:\n{text}"
    return float(m.group(1))


def per_worker(metrics_dir, pid: int, tmp_path) -> str:
    """The metrics one worker wrote, read alone: its own files in a directory of their own."""
    alone = tmp_path / f"alone-{pid}"
    alone.mkdir()
    for f in metrics_dir.glob(f"*_{pid}.db"):
        shutil.copy(f, alone)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, str(alone))
    return generate_latest(registry).decode()


def test_metrics_add_up_over_workers(start_server, digits, tmp_path):
    metrics_dir = tmp_path / "metrics"
    s = start_server(*digits, "--workers", "2", "--metrics-dir", str(metrics_dir))
    pids = [p.pid for p in workers_of(s)]
    n = 40
    for _ in range(n):  # a new connection each: the kernel spreads them over the workers
        assert s.request("POST", INFER, BODY, {"Content-Type": "application/json"})[0] == 200
    counted = 'edgefleet_runtime_requests_total{code="200",endpoint="infer"}'
    by_worker = [sample(per_worker(metrics_dir, pid, tmp_path), counted) for pid in pids]
    assert all(c > 0 for c in by_worker), by_worker  # both served some ...
    assert sum(by_worker) == n  # ... and together all of them
    for _ in range(6):  # whichever worker answers the scrape, it reports the sum
        text = scrape(s)
        assert sample(text, counted) == n
        assert sample(text, "edgefleet_runtime_inference_seconds_count") == n
        assert sample(text, "edgefleet_runtime_reloads_total", '{result="loaded"}') == 2  # one load per worker
        assert sample(text, "edgefleet_runtime_ready") == 1
        assert re.search(rf'^edgefleet_runtime_model_info{{.*digest="{digits[1]}".*}} 1.0$', text, re.M)
    assert s.stop() == 0, s.logs()
    assert not any(psutil.pid_exists(p) for p in pids)


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--management-port", "0"], "--management-port"),
        (["--management-token-file", "/nonexistent"], "--management-token-file"),
        (["--monitoring"], "--monitoring"),
        (["--drift-reference", "/nonexistent"], "--drift-reference"),
    ],
)
def test_state_of_one_process_is_refused_with_workers(digits, tmp_path, extra, named):
    cmd = [sys.executable, "-m", "edgefleet_runtime.cli", "serve", "--model", str(digits[0]), "--digest", digits[1],
           "--port", "0", "--workers", "2", "--cache", str(tmp_path), *extra]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == EXIT_USAGE
    assert f"--workers 2 cannot be combined with {named}" in r.stderr and "--workers 1" in r.stderr, r.stderr


def test_workers_must_be_positive(digits):
    cmd = [sys.executable, "-m", "edgefleet_runtime.cli", "serve", "--model", str(digits[0]), "--digest", digits[1],
           "--port", "0", "--workers", "0"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == EXIT_USAGE and "--workers must be at least 1" in r.stderr


def test_caps_are_divided_per_worker():
    limits = Limits(max_connections=256, body_budget_bytes=100, max_concurrency=3, header_seconds=7.0)
    share = limits.shared_by(2)
    assert (share.max_connections, share.body_budget_bytes, share.max_concurrency) == (128, 50, 1)
    assert share.header_seconds == 7.0 and share.max_body_bytes == limits.max_body_bytes and share.workers == 2
    assert limits.shared_by(8).max_concurrency == 1  # never 0


def test_body_budget_is_each_workers_share(start_server, digits):
    reserve = 24 * len(BODY)  # what a JSON body of this size takes of the budget
    budget = reserve * 3 // 2  # room for one body in one process, none in half of it
    headers = {"Content-Type": "application/json"}
    one = start_server(*digits, "--body-budget-bytes", str(budget))
    assert one.request("POST", INFER, BODY, headers)[0] == 200
    two = start_server(*digits, "--workers", "2", "--body-budget-bytes", str(budget))
    for _ in range(6):  # every worker has only its share
        status, _, body = two.request("POST", INFER, BODY, headers)
        assert status == 413, body
        assert f"body budget of {budget // 2} (--body-budget-bytes / --workers 2)" in json.loads(body)["error"]
    assert sample(scrape(two), "edgefleet_runtime_refused_total", '{reason="body_too_large"}') == 6


def test_grpc_is_served_by_one_worker(start_server, digits):
    import tritonclient.grpc as grpcclient
    from conftest import free_port

    gport = free_port()
    s = start_server(*digits, "--workers", "2", "--grpc-port", str(gport))
    procs = workers_of(s)
    deadline = time.monotonic() + 10
    while sum(listening(p, gport) for p in procs) < 1:
        assert time.monotonic() < deadline, s.logs()
        time.sleep(0.05)
    assert [listening(p, gport) for p in procs].count(True) == 1
    assert all(listening(p, s.port) for p in procs)  # REST on every worker
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{gport}")
    assert client.is_server_live()
    inp = grpcclient.InferInput("input", [1, 1, 8, 8], "FP32")
    inp.set_data_from_numpy(X)
    assert client.infer("digits", [inp]).as_numpy("logits").shape == (1, 10)
    client.close()


def _half_sent(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(BODY)}\r\n\r\n".encode()
    sock.sendall(head + BODY[:100])
    return sock


def test_sigterm_drains_every_worker(start_server, digits):
    s = start_server(*digits, "--workers", "2", "--max-concurrency", "64")
    procs = workers_of(s)
    socks: list[socket.socket] = []
    while not all(established(p, s.port) for p in procs):  # in-flight requests on both workers
        assert len(socks) < 24
        socks += [_half_sent(s.port) for _ in range(4)]
        deadline = time.monotonic() + 10
        while sum(established(p, s.port) for p in procs) < len(socks):  # all accepted
            assert time.monotonic() < deadline
            time.sleep(0.05)
    time.sleep(0.5)  # and their heads read: the requests are in flight
    s.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    for sock in socks:
        sock.sendall(BODY[100:])
    for sock in socks:
        sock.settimeout(10)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in data, data[:200]
        sock.close()
    assert s.proc.wait(15) == 0, s.logs()
    assert s.logs().count('"drained":true') == 2
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs)


def test_sighup_reloads_every_worker(start_server, tmp_path, digits, digits_v1):
    cache = tmp_path / "cache"
    s = start_server(make_cache(cache, *digits), digits[1], "--workers", "2")
    workers_of(s)
    make_cache(cache, *digits_v1)
    s.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while sample(scrape(s), "edgefleet_runtime_reloads_total", '{result="loaded"}') < 4:  # 2 starts + 2 reloads
        assert time.monotonic() < deadline, s.logs()
        time.sleep(0.1)
    v1 = digits_v1[1].split(":")[1][:12]
    for _ in range(10):  # fresh connections reach both workers: each serves the new variant
        assert json.loads(s.request("GET", "/v2/models/digits")[2])["versions"] == [v1]
    text = scrape(s)
    assert re.search(rf'^edgefleet_runtime_model_info{{.*digest="{digits_v1[1]}".*}} 1.0$', text, re.M)
    assert re.search(rf'^edgefleet_runtime_model_info{{.*digest="{digits[1]}".*}} 0.0$', text, re.M)


def test_a_worker_that_dies_stops_the_server(start_server, digits):
    s = start_server(*digits, "--workers", "2")
    first, second = workers_of(s)  # both serving (a worker still loading would just exit)
    first.kill()
    assert s.proc.wait(15) != 0
    assert "a worker exited; stopping the others" in s.logs()
    second.wait(5)
    assert not psutil.pid_exists(second.pid) and '"drained":true' in s.logs()  # the other one drained and stopped


def test_a_worker_start_failure_is_the_exit_code(start_server, digits, digits_v1):
    s = start_server(digits[0], digits_v1[1], "--workers", "2", wait=False)
    assert s.proc.wait(30) == EXIT_DIGEST
    assert "refusing to serve" in s.logs()


def test_port_zero_gives_all_workers_one_port(digits):
    cmd = [sys.executable, "-m", "edgefleet_runtime.cli", "serve", "--model", str(digits[0]), "--digest", digits[1],
           "--host", "127.0.0.1", "--port", "0", "--workers", "2", "--threads", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        listened = []
        for line in proc.stdout:
            if '"listening"' in line:
                listened.append(json.loads(line))
                if len(listened) == 2:
                    break
        assert sorted(e["worker"] for e in listened) == [0, 1]
        assert listened[0]["port"] == listened[1]["port"] != 0
        c = http.client.HTTPConnection("127.0.0.1", listened[0]["port"], timeout=10)
        c.request("GET", "/v2/health/ready")
        assert c.getresponse().status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(15)
        assert code == 0, f"exit {code} after SIGTERM; the server said: {proc.stdout.read()[-3000:]}"



def test_rendered_pod_runs_workers(start_server, digits, tmp_path):
    """runtime.workers in an EdgeDeployment: the pod's args, its metrics emptyDir, served here; refused with
    monitoring (CEL and the model's own check)."""
    import uuid

    from edgefleet.api import EdgeDeployment, Variant, builtin_profiles
    from edgefleet.render import render_class
    from edgefleet.render.workload import CACHE_MOUNT, METRICS_MOUNT
    from pydantic import ValidationError

    profiles = builtin_profiles()
    profile = next(p for p in profiles if p.metadata["name"] == "cpu-amd64")
    meta = {"name": "digits", "namespace": "default", "uid": str(uuid.uuid4())}
    ed = EdgeDeployment(metadata=meta, spec={"modelRef": {"name": "digits"}, "runtime": {"workers": 2}})
    variant = Variant(profile="cpu-amd64", artifact="oci://r/x@" + digits[1], digest=digits[1], state="Ready")
    pod = render_class(ed, profile, variant, profiles, CACHE_MOUNT)["spec"]["template"]["spec"]
    serve = pod["containers"][0]
    assert "--workers=2" in serve["args"] and f"--metrics-dir={METRICS_MOUNT}" in serve["args"]
    assert {"name": "runtime-metrics", "mountPath": METRICS_MOUNT} in serve["volumeMounts"]
    assert {"name": "runtime-metrics", "emptyDir": {"sizeLimit": "64Mi"}} in pod["volumes"]
    one = EdgeDeployment(metadata=meta, spec={"modelRef": {"name": "digits"}})
    one_serve = render_class(one, profile, variant, profiles, CACHE_MOUNT)["spec"]["template"]["spec"]
    assert not any(a.startswith("--workers") for a in one_serve["containers"][0]["args"])  # default: unchanged pod
    args = [a for a in serve["args"][1:] if not a.startswith(("--model=", "--digest=", "--name=", "--port="))]
    args = [f"--metrics-dir={tmp_path / 'metrics'}" if a.startswith("--metrics-dir=") else a for a in args]
    s = start_server(*digits, *args)
    assert len(workers_of(s)) == 2 and list((tmp_path / "metrics").glob("*.db"))
    with pytest.raises(ValidationError, match="spec.runtime.workers above 1 cannot be combined with spec.monitoring"):
        EdgeDeployment(metadata=meta, spec={"modelRef": {"name": "digits"}, "runtime": {"workers": 2},
                                            "monitoring": {}})  # fmt: skip
