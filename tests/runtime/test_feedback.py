"""Hard examples leave the node (registry away for a while: nothing lost), come back with `edgefleet examples pull`,
and the drift reference is computed from the evaluation data by the served model (serve --drift-eval)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import models
import numpy as np
import pytest
import yaml
from conftest import free_port
from edgefleet_runtime.monitor import probabilities
from test_monitor import _infer, _metrics, _noisy, _value

EVAL = models.REPO / "examples" / "quickstart" / "digits_eval.npz"


def _registry_binary():
    from edgefleet_dev.toolchain import binary_path

    path = binary_path("registry")
    if not path.exists():
        pytest.skip(f"no CNCF registry binary at {path}; `edgefleet cluster up` builds it")
    return path


@pytest.fixture
def registry_later(tmp_path):
    """A loopback port with no registry yet, and a function that starts one there (stopped afterwards)."""
    binary, port = _registry_binary(), free_port()
    procs: list[subprocess.Popen] = []

    def start() -> None:
        config = tmp_path / "registry.yaml"
        config.write_text(yaml.safe_dump({
            "version": 0.1, "log": {"level": "warn"}, "http": {"addr": f"127.0.0.1:{port}"},
            "storage": {"filesystem": {"rootdirectory": str(tmp_path / "registry-data")}}}))
        procs.append(subprocess.Popen([str(binary), "serve", str(config)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, env={"OTEL_TRACES_EXPORTER": "none"}))

    yield f"127.0.0.1:{port}", start
    for p in procs:
        p.terminate()
        p.wait(10)


def _confidences(model, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    logits = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    return probabilities(logits).max(1)


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.1)
    return value


def test_registry_down_loses_nothing_and_the_pulled_npz_holds_exactly_the_unsure_inputs(
        start_server, digits, registry_later, tmp_path):
    from edgefleet.artifacts.examples import pull

    registry, start_registry = registry_later
    with np.load(EVAL) as z:
        x = z["input"][:80]
    sent = np.concatenate([x[:40], _noisy(x[40:])])
    conf = _confidences(digits[0], sent)
    low = conf < 0.9
    assert 0 < low.sum() < len(sent), "the mix must hold both sure and unsure predictions"
    spool = tmp_path / "spool"
    server = start_server(*digits, "--hard-examples-dir", str(spool), "--uncertain-below", "0.9",
                          "--hard-examples-upload", f"oci://{registry}/fleet/hard", "--hard-examples-batch", "7",
                          "--hard-examples-upload-interval", "0.2", "--node-name", "node-a")
    for i in range(0, len(sent), 16):
        _infer(server, sent[i:i + 16])

    # the registry is away: every unsure example stays in the spool, pushes fail and are counted
    _wait(lambda: _value(_metrics(server), "edgefleet_runtime_hard_examples_upload_failures_total") >= 2, 20,
          "two failed pushes")
    m = _metrics(server)
    assert _value(m, "edgefleet_runtime_hard_examples_stored") == low.sum()
    assert len(list(spool.glob("*.npz"))) == low.sum()
    assert _value(m, "edgefleet_runtime_hard_examples_uploaded_total") == 0
    assert "Connection refused" in server.logs()  # they failed because nothing listened

    start_registry()  # it comes back: everything goes up, in batches of at most 7, and leaves the spool
    _wait(lambda: _value(_metrics(server), "edgefleet_runtime_hard_examples_uploaded_total") == low.sum(), 60,
          f"{low.sum()} uploaded examples")
    assert not list(spool.glob("*.npz"))
    assert _value(_metrics(server), "edgefleet_runtime_hard_examples_stored") == 0

    arrays = pull(f"oci://{registry}/fleet/hard", tmp_path / "hard.npz")
    assert len(arrays["confidence"]) == low.sum()
    # exactly the unsure inputs, each once (upload order = spool order = request order)
    np.testing.assert_array_equal(arrays["input"], sent[low])
    np.testing.assert_allclose(arrays["confidence"], conf[low], rtol=1e-5)
    assert set(arrays["node"].tolist()) == {"node-a"} and set(arrays["model_digest"].tolist()) == {digits[1]}
    assert arrays["predicted"].shape == (low.sum(),)
    with np.load(tmp_path / "hard.npz") as z:  # the file on disk is what pull returned
        assert z["input"].shape == (low.sum(), *x.shape[1:])


def test_drift_eval_reference_flags_a_shift_and_not_eval_like_traffic(start_server, digits):
    with np.load(EVAL) as z:
        x = z["input"]
    server = start_server(*digits, "--drift-eval", str(EVAL), "--drift-window", "100")
    for i in range(0, 100, 20):  # traffic like the evaluation data
        _infer(server, x[i:i + 20])
    m = _metrics(server)
    assert _value(m, "edgefleet_runtime_drift_window_samples") == 100
    assert max(_value(m, "edgefleet_runtime_drift_psi", statistic=s) for s in ("classes", "input")) < 0.2
    assert _value(m, "edgefleet_runtime_drifting") == 0
    shifted = (x[:100] * 0.2 + 2.0).astype(np.float32)  # brighter, flatter inputs
    for i in range(0, 100, 20):
        _infer(server, shifted[i:i + 20])
    m = _metrics(server)
    assert _value(m, "edgefleet_runtime_drift_psi", statistic="input") >= 0.2
    assert _value(m, "edgefleet_runtime_drifting") == 1


def test_bad_feedback_flags_exit_2_naming_the_flag(start_server, digits, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, pixels=np.zeros((4, 3), np.float32), other=np.zeros((4, 3), np.float32))
    server = start_server(*digits, "--drift-eval", str(bad), wait=False)
    assert server.proc.wait(30) == 2
    assert "--drift-eval" in server.logs() and "input" in server.logs()
    server = start_server(*digits, "--hard-examples-upload", "oci://127.0.0.1:1/x", wait=False)
    assert server.proc.wait(30) == 2
    assert "--hard-examples-upload needs --hard-examples-dir" in server.logs()


@pytest.mark.skipif(os.geteuid() != 0, reason="prepare-cache hands folders to another user: needs root")
def test_prepare_cache_makes_the_spool_for_the_runtime_user_and_refuses_paths_outside(tmp_path):
    cache = tmp_path / "cache"
    (cache / "sha256").mkdir(parents=True)
    os.chown(cache, 10001, 10001)  # a cache an earlier pod already handed over
    run = [sys.executable, "-m", "edgefleet_runtime.cli", "prepare-cache", f"--cache={cache}", "--uid=10001"]
    assert subprocess.run([*run, "--spool=hard-examples/shop/digits"], capture_output=True).returncode == 0
    for folder in (cache, cache / "hard-examples", cache / "hard-examples/shop", cache / "hard-examples/shop/digits"):
        assert (folder.stat().st_uid, folder.stat().st_gid) == (10001, 10001), folder
    bad = subprocess.run([*run, "--spool=../elsewhere"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--spool ../elsewhere: give a path inside the cache" in bad.stderr
    assert not (tmp_path / "elsewhere").exists()


def test_one_uploader_per_spool_at_a_time_and_a_failed_push_keeps_the_batch(tmp_path):
    """Two pods on a node (a surge rollout) share the spool: while one uploads, the other skips; a push that fails
    leaves every file where it was."""
    import fcntl

    from edgefleet_runtime.feedback import LOCK, Uploader
    from edgefleet_runtime.monitor import HardExamples

    spool = HardExamples(str(tmp_path / "spool"))
    for i in range(5):
        (spool.dir / f"{i:020d}-0000.npz").write_bytes(b"x" * 10)
    pushed: list[list[str]] = []

    def push(files, annotations, tag):
        pushed.append([f.name for f in files])

    def refuse(files, annotations, tag):
        raise OSError("registry away")

    uploader = Uploader(spool, "oci://127.0.0.1:1/r", {"class": "c", "node": "n"}, batch=3, push=push)
    with open(spool.dir / LOCK, "a") as held:  # the other pod is uploading
        fcntl.flock(held, fcntl.LOCK_EX)
        assert uploader.upload_once() == 0 and pushed == []
    failing = Uploader(spool, "oci://127.0.0.1:1/r", {}, batch=3, push=refuse)
    with pytest.raises(OSError):
        failing.upload_once()
    assert len(list(spool.dir.glob("*.npz"))) == 5
    assert uploader.upload_once() == 3 and uploader.upload_once() == 2 and uploader.upload_once() == 0
    assert pushed == [[f"{i:020d}-0000.npz" for i in range(3)], [f"{i:020d}-0000.npz" for i in (3, 4)]]
    assert not list(spool.dir.glob("*.npz"))
