"""`edgefleet-federated server|client` as separate processes on loopback: the pods' commands."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
from edgefleet.federated_tls import make_bundle
from federated_helpers import EVAL, MODELS, client_names, eval_data, fresh_head_model, noniid_shards, shard_npz

CLI = [sys.executable, "-c", "from edgefleet.federated_cli import main; main()"]


def _tls_dirs(tmp_path, clients: int = 3) -> dict[str, Path]:
    """One directory per side, as each pod mounts its own Secret: "server", "c0", "c1", ..."""
    bundle = make_bundle("cli", ["localhost"], client_names(clients))
    data = {"server": bundle.server_secret_data(), **{c: bundle.client_secret_data(c) for c in bundle.clients}}
    dirs = {}
    for side, files in data.items():
        d = dirs[side] = tmp_path / "tls" / side
        d.mkdir(parents=True)
        for k, v in files.items():
            (d / k).write_bytes(v)
    return dirs


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_federated_cli_server_and_clients_publish_a_better_model(tmp_path):
    tls, port, store = _tls_dirs(tmp_path), _port(), tmp_path / "store"
    server, clients = _start(tmp_path, tls, port, store, "--rounds=2")
    out, err = server.communicate(timeout=300)
    assert server.returncode == 0, err[-2000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert report["state"] == "Succeeded" and [r["clients"] for r in report["rounds"]] == [3, 3]
    assert report["finalAccuracy"] > report["startAccuracy"]
    assert report["refusedClients"] == [] and all(r["refused"] == [] for r in report["rounds"])  # honest: none
    for c in clients:
        c_out, c_err = c.communicate(timeout=60)
        assert c.returncode == 0, c_err[-2000:]
        sent = [json.loads(line) for line in c_out.splitlines() if '"sent"' in line]
        fits = [s["bytes"] for s in sent if s["kind"] == "fit_ins"]
        assert len(fits) == 2 and all(n <= report["parameterBytes"] + 512 for n in fits)
    # the published model is the whole graph with the new head, and scores what the report says
    digest = report["published"]["digest"]
    blob = (store / "sha256" / digest.split(":")[1]).read_bytes()
    x, y = eval_data()
    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    acc = float((sess.run(None, {"input": x})[0].argmax(1) == y).mean())
    assert abs(acc - report["finalAccuracy"]) < 1e-3


def test_federated_cli_refuses_a_model_it_cannot_train(tmp_path):
    tls = _tls_dirs(tmp_path, 1)
    r = subprocess.run(CLI + ["server", f"--model={MODELS / 'tiny_encoder.onnx'}", f"--eval={EVAL}",
                              f"--tls-dir={tls['server']}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "UnsupportedModel" in r.stderr and "final dense layer" in r.stderr


def _start(tmp_path, tls, port, store, *server_args):
    (tmp_path / "model.onnx").write_bytes(fresh_head_model())
    for i, (x, y) in enumerate(noniid_shards()):
        (tmp_path / f"data-{i}.npz").write_bytes(shard_npz(x, y))
    server = subprocess.Popen(CLI + ["server", f"--model={tmp_path / 'model.onnx'}", f"--eval={EVAL}",
                                     f"--tls-dir={tls['server']}", f"--port={port}", "--min-clients=3",
                                     "--expected-clients=3", f"--store={store}", "--wait-seconds=60", *server_args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    clients = [subprocess.Popen(CLI + ["client", f"--model={tmp_path / 'model.onnx'}",
                                       f"--data={tmp_path}/data-{{index}}.npz", f"--index={i}",
                                       f"--server=127.0.0.1:{port}", "--server-name=localhost",
                                       f"--tls-dir={tls[f'c{i}']}"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    return server, clients


def test_federated_boundary_evaluation_gate_runs_before_any_publish(tmp_path):
    """A run whose result misses spec.evaluation.minAccuracy publishes nothing: the gate comes first."""
    tls, port, store = _tls_dirs(tmp_path), _port(), tmp_path / "store"
    server, clients = _start(tmp_path, tls, port, store, "--rounds=1", "--min-accuracy=1.0")
    out, err = server.communicate(timeout=300)
    for c in clients:
        c.communicate(timeout=60)
    assert server.returncode == 1, err[-2000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert report["state"] == "Failed" and report["reason"] == "AccuracyGate", report
    assert report["finalAccuracy"] > report["startAccuracy"]  # it trained, yet missed the gate of 1.0
    assert "nothing published" in report["message"] and report.get("published") is None
    assert not store.exists() or not any(p.is_file() for p in store.rglob("*"))  # no blob, no tag


def test_federated_boundary_gate_needs_both_the_start_and_the_minimum():
    from edgefleet.federated_cli import gate

    assert gate(0.95, 0.10, 0.90, 3) is None
    assert "does not beat the start (0.9600)" in gate(0.95, 0.96, 0.0, 3)
    assert "the gate (0.9700)" in gate(0.95, 0.10, 0.97, 3)
