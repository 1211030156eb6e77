"""In-place switch: ``serve --control-dir`` loads the variant the `active` file names beside the served one and
swaps it in while a client keeps asking; nothing fails and no answer comes from a half-loaded model."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import models
import numpy as np
from edgefleet_runtime.fetch import fetch

INPUTS = np.load(models.QUICKSTART / "digits_eval.npz")["input"][:4]


def _payload() -> dict:
    return {"inputs": [{"name": "input", "shape": list(INPUTS.shape), "datatype": "FP32",
                        "data": INPUTS.ravel().tolist()}]}


def _write(path: Path, text: str) -> None:
    """As the kubelet updates a downward-API file: a new file renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _cache(tmp_path, *files: Path) -> tuple[Path, list[str]]:
    cache = tmp_path / "cache"
    digests = []
    for f in files:
        digest = models.sha256(f)
        fetch(f.as_uri(), digest, cache)
        digests.append(digest)
    return cache, digests


class Poller:
    """A client asking all the time: (seconds since start, HTTP status, model_version, logits) per answer."""

    def __init__(self, server):
        self.server, self.answers, self.stop = server, [], threading.Event()
        self.t0 = time.monotonic()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        body = _payload()
        while not self.stop.is_set():
            try:
                status, out = self.server.infer_json(body)
            except OSError as e:
                self.answers.append((time.monotonic() - self.t0, f"error {e}", None, None))
                continue
            logits = None
            if status == 200:
                logits = np.array(out["outputs"][0]["data"], np.float32).reshape(INPUTS.shape[0], -1)
            self.answers.append((time.monotonic() - self.t0, status, (out or {}).get("model_version"), logits))

    def first(self, version: str, timeout: float = 30.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, _, v, _ in list(self.answers):
                if v == version:
                    return t
            time.sleep(0.01)
        raise AssertionError(f"no answer from version {version} within {timeout} s")

    def finish(self):
        self.stop.set()
        self.thread.join(10)
        return self.answers


def test_switch_in_place_under_load_fails_nothing_and_beats_a_cold_start(tmp_path, start_server):
    base, updated = models.head_update(tmp_path / "models")
    cache, (d0, d1) = _cache(tmp_path, base, updated)
    refs = {d0[7:19]: models.reference_outputs(base, INPUTS), d1[7:19]: models.reference_outputs(updated, INPUTS)}
    assert not np.allclose(refs[d0[7:19]], refs[d1[7:19]], rtol=1e-5, atol=1e-6)  # answers tell the models apart
    control = tmp_path / "control"
    control.mkdir()
    _write(control / "active", d0)
    server = start_server(cache / "sha256" / d0[7:], d0, "--cache", str(cache), "--control-dir", str(control))
    poller = Poller(server)
    time.sleep(1.0)
    activated = time.monotonic() - poller.t0
    _write(control / "active", d1)
    switched = poller.first(d1[7:19]) - activated
    time.sleep(1.0)
    answers = poller.finish()

    cold = time.monotonic()
    start_server(cache / "sha256" / d1[7:], d1, "--cache", str(cache))
    cold = time.monotonic() - cold
    print(f"\nswitch: {len(answers)} answers, activation -> new digest served in place {switched:.3f} s "
          f"(poll interval 0.5 s); cold start of a new server {cold:.3f} s")

    assert [a for a in answers if a[1] != 200] == []
    versions = [v for _, _, v, _ in answers]
    assert set(versions) == {d0[7:19], d1[7:19]}
    flip = versions.index(d1[7:19])
    assert versions[flip:] == [d1[7:19]] * (len(versions) - flip)  # one atomic swap: never back
    for _, _, version, logits in answers:  # each answer is the whole of one model's
        np.testing.assert_allclose(logits, refs[version], rtol=1e-5, atol=1e-5)
    assert switched < 5.0
    metrics = server.request("GET", "/metrics")[2].decode()
    assert f'edgefleet_runtime_control{{digest="{d1}",kind="active",state="done"}} 1.0' in metrics


def test_switch_to_a_variant_not_in_the_cache_or_corrupt_keeps_the_old_one(tmp_path, start_server):
    base, updated = models.head_update(tmp_path / "models")
    cache, (d0,) = _cache(tmp_path, base)
    d1 = models.sha256(updated)
    control = tmp_path / "control"
    control.mkdir()
    server = start_server(cache / "sha256" / d0[7:], d0, "--cache", str(cache), "--control-dir", str(control))
    _write(control / "active", d1)
    time.sleep(1.5)
    metrics = server.request("GET", "/metrics")[2].decode()
    assert f'edgefleet_runtime_control{{digest="{d1}",kind="active",state="missing"}} 1.0' in metrics
    status, out = server.infer_json(_payload())
    assert status == 200 and out["model_version"] == d0[7:19]
    # bytes under the digest's name that are not that digest's: refused at load, the old model serves on
    blob = cache / "sha256" / d1[7:]
    blob.write_bytes(base.read_bytes())
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:  # retried after control.RETRY_SECONDS at the latest
        metrics = server.request("GET", "/metrics")[2].decode()
        if f'edgefleet_runtime_control{{digest="{d1}",kind="active",state="failed"}} 1.0' in metrics:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("the corrupt variant was not refused:\n" + server.logs()[-3000:])
    assert "digest mismatch" in server.logs()
    status, out = server.infer_json(_payload())
    assert status == 200 and out["model_version"] == d0[7:19]


def test_switch_after_prefetch_through_the_control_folder(tmp_path, start_server):
    base, updated = models.head_update(tmp_path / "models")
    cache, (d0,) = _cache(tmp_path, base)
    d1 = models.sha256(updated)
    control = tmp_path / "control"
    control.mkdir()
    server = start_server(cache / "sha256" / d0[7:], d0, "--cache", str(cache), "--control-dir", str(control))
    _write(control / "prefetch", json.dumps({"ref": updated.as_uri(), "digest": d1}))
    deadline = time.monotonic() + 20
    while not (cache / "sha256" / d1[7:]).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (cache / "sha256" / d1[7:]).read_bytes() == updated.read_bytes()
    assert server.infer_json(_payload())[1]["model_version"] == d0[7:19]  # prefetched, not activated
    _write(control / "active", d1)
    deadline = time.monotonic() + 10
    while server.infer_json(_payload())[1]["model_version"] != d1[7:19]:
        assert time.monotonic() < deadline, server.logs()[-3000:]
        time.sleep(0.1)
    _write(control / "prefetch", "{not json")
    time.sleep(1.0)
    metrics = server.request("GET", "/metrics")[2].decode()
    assert 'edgefleet_runtime_control{digest="",kind="prefetch",state="failed"} 1.0' in metrics
    assert "prefetch: not JSON" in server.logs()


def test_switch_control_dir_needs_the_cache(tmp_path, start_server, digits):
    server = start_server(digits[0], digits[1], "--control-dir", str(tmp_path), wait=False)
    assert server.proc.wait(20) == 2
    assert "--control-dir needs --cache" in server.logs()
