"""Progress (edgefleet.progress with rich): live on a terminal, plain lines in CI logs."""

from __future__ import annotations

import io
import time
from pathlib import Path

from click.testing import CliRunner
from edgefleet.compiler.cli import compile_command
from edgefleet.progress import Progress, duration
from edgefleet_dev import toolchain as components
from rich.console import Console

M = Path(__file__).resolve().parent.parent / "fixtures" / "models"


def test_plain_lines_say_start_changes_heartbeat_and_end():
    lines: list[str] = []
    with Progress(lines.append, live=False, heartbeat=0.2) as progress:
        task = progress.add("[build 1/1] etcd", estimate=600, status="building")
        time.sleep(0.8)  # the ticker wakes every 0.5 s: at least one heartbeat
        progress.done(task, "done in 1s")
        waiting = progress.add("  rollout", total=60, status="0/2 pods")
        progress.update(waiting, 1, "0/2 pods")  # same note: no new line
        progress.update(waiting, 2, "1/2 pods")
        progress.done(waiting, "1/2 pods")  # nothing new to say
    assert lines[0].startswith("[build 1/1] etcd: building (0s, about 10m00s left)")
    assert any(line.startswith("[build 1/1] etcd: building (") for line in lines[1:-3]), lines  # the heartbeat
    assert lines[-3:] == ["[build 1/1] etcd: done in 1s", "  rollout: 0/2 pods", "  rollout: 1/2 pods"]
    assert all("\x1b" not in line for line in lines)  # no control characters in a log


def test_live_display_draws_bars(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr("edgefleet.progress.Console", lambda **kw: Console(file=out, force_terminal=True, width=100))
    with Progress(live=True) as progress:
        task = progress.add("[compile] cpu-amd64", total=4, status="0/4 candidates, now fp32")
        progress.update(task, 2, "2/4 candidates, now dynamic-int8")
        progress.done(task, "4/4 candidates measured")
    assert "4/4 candidates measured" in out.getvalue() and "━" in out.getvalue()


def test_cold_build_estimates_each_component_from_its_last_log(tmp_path, monkeypatch):
    monkeypatch.setattr(components, "cache_dir", lambda: tmp_path)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "build-etcd-v0.log").write_text("go build ...\nbuilt in 42.5s\n")
    assert components.estimate(components.COMPONENTS["etcd"]) == 42.5
    fresh = components.estimate(components.COMPONENTS["kube-apiserver"])  # no log: the 2-core figure, scaled
    assert 0 < fresh <= components.COLD_BUILD_SECONDS["kube-apiserver"]

    def build_one(go, comp):
        log = tmp_path / "logs" / f"build-{comp.name}-{comp.version}.log"
        log.write_text("go build ...\n")
        return log

    monkeypatch.setattr(components, "missing", lambda names: [components.COMPONENTS[n] for n in names])
    monkeypatch.setattr(components, "_build_one", build_one)
    monkeypatch.setattr(components, "binary_path", lambda name: tmp_path / "absent")
    monkeypatch.setattr(components.shutil, "which", lambda name: "/usr/bin/go")
    lines: list[str] = []
    built = components.build_all(lines.append, ["etcd", "kubectl"], live=False)
    assert set(built) == {"etcd", "kubectl"}
    assert lines[0].startswith("building 2 components from their Go modules, about ")
    assert lines[1].startswith("[build 1/2] etcd v") and "about 42s left" in lines[1]
    assert lines[2].startswith("[build 1/2] etcd v") and lines[2].endswith("done in 0s")
    assert "built in" in (tmp_path / "logs" / f"build-etcd-{components.COMPONENTS['etcd'].version}.log").read_text()


def test_compile_says_each_profiles_candidates(tmp_path):
    result = CliRunner().invoke(compile_command, [
        str(M / "digits_cnn.onnx"), "--profile", "cpu-amd64", "--quantization", "auto", "--timing-runs", "2",
        "--eval", str(M / "digits_eval.npz"), "--calibration", str(M / "digits_calib.npz"),
        "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines()
             if line.startswith("[compile] cpu-amd64: ") and " candidates" in line]
    assert lines[0] == "[compile] cpu-amd64: 0/4 candidates, now fp32"
    assert lines[-1] == "[compile] cpu-amd64: 4/4 candidates measured"
    assert [line.split(", now ")[1] for line in lines[:-1] if ", now " in line] == [
        "fp32", "fp16", "dynamic-int8", "static-int8"]


def test_durations_read_as_people_write_them():
    assert (duration(12), duration(245), duration(3720)) == ("12s", "4m05s", "1h02m")
