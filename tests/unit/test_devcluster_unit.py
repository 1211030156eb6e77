"""Dev cluster pieces that need no running cluster: fleet files, build errors, the up lock."""

from __future__ import annotations

import fcntl
import os
import textwrap

import pytest
from edgefleet.devcluster import cluster as dc
from edgefleet.devcluster import components, fleet


def _write(tmp_path, text):
    path = tmp_path / "fleet.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_default_fleet_has_every_device_class():
    f = fleet.load_fleet()
    nodes = f.nodes()
    labels = [n["metadata"]["labels"] for n in nodes]
    assert any(lbl.get("nvidia.com/gpu.product", "").startswith("NVIDIA-Jetson") for lbl in labels)
    assert any(lbl.get("feature.node.kubernetes.io/usb-fe_1a6e_089a.present") == "true" for lbl in labels)
    assert any(lbl.get("feature.node.kubernetes.io/cpu-cpuid.AVX512VNNI") == "true" for lbl in labels)
    assert {lbl["kubernetes.io/arch"] for lbl in labels} >= {"amd64", "arm64"}
    gpu_nodes = [n for n in nodes if "nvidia.com/gpu" in n["status"]["capacity"]]
    assert gpu_nodes and all(n["status"]["allocatable"]["nvidia.com/gpu"] for n in gpu_nodes)
    edge = [n for n in nodes if "node-role.kubernetes.io/edge" in n["metadata"]["labels"]]
    assert edge and all(
        {"key": "node-role.kubernetes.io/edge", "value": "", "effect": "NoSchedule"} in n["spec"]["taints"]
        for n in edge
    )
    assert len({n["metadata"]["name"] for n in nodes}) == len(nodes)


def test_scale_multiplies_every_class():
    f = fleet.load_fleet()
    assert len(f.nodes(scale=5)) == 5 * len(f.classes)


def test_unknown_field_names_the_entry(tmp_path):
    path = _write(tmp_path, """
        classes:
          - name: pi
            labels: {kubernetes.io/arch: arm64}
          - name: jetson
            gpus: 1
    """)
    with pytest.raises(fleet.FleetError) as err:
        fleet.load_fleet(path)
    msg = str(err.value)
    assert str(path) in msg and "classes[1] (class 'jetson').gpus" in msg and "Extra inputs" in msg


def test_bad_label_names_the_entry_and_label(tmp_path):
    path = _write(tmp_path, """
        classes:
          - name: pi
            labels: {"kubernetes.io/arch": "arm 64"}
    """)
    with pytest.raises(fleet.FleetError) as err:
        fleet.load_fleet(path)
    assert "classes[0] (class 'pi').labels" in str(err.value) and "kubernetes.io/arch='arm 64'" in str(err.value)


def test_bad_label_key_is_rejected(tmp_path):
    path = _write(tmp_path, """
        classes:
          - name: pi
            labels: {"-bad/key": "x"}
    """)
    with pytest.raises(fleet.FleetError, match="not a valid Kubernetes label key"):
        fleet.load_fleet(path)


def test_missing_go_toolchain_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEFLEET_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(components.BuildError, match="Go toolchain is not on PATH"):
        components.build_all(echo=lambda _: None)


def test_failed_build_names_component_and_log(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEFLEET_CACHE", str(tmp_path))
    broken = components.Component("etcd", "v0.0.0-broken", "etcd", "go.etcd.io/etcd/server/v3/no-such-package")
    monkeypatch.setattr(components, "COMPONENTS", {"etcd": broken})
    with pytest.raises(components.BuildError) as err:
        components.build_all(echo=lambda _: None)
    log = tmp_path / "logs" / "build-etcd-v0.0.0-broken.log"
    assert "building etcd v0.0.0-broken failed" in str(err.value) and str(log) in str(err.value)
    assert log.exists() and not (tmp_path / "bin" / "etcd-v0.0.0-broken").exists()


def test_second_up_while_one_is_starting_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEFLEET_CACHE", str(tmp_path))
    state = dc.state_dir("busy")
    state.mkdir(parents=True)
    with (state.parent / ".busy.lock").open("a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fh.write(str(os.getpid()))
        fh.flush()
        busy = rf"another `edgefleet cluster up` is in progress .*pid {os.getpid()}"
        with pytest.raises(dc.ClusterError, match=busy):
            dc.up("busy", echo=lambda _: None)


def test_down_cleans_up_after_a_crashed_up(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEFLEET_CACHE", str(tmp_path))
    state = dc.state_dir("crashed")
    (state / "pids").mkdir(parents=True)
    (state / "pids" / "etcd.pid").write_text("999999\n")  # a pid that is not ours
    (state / "logs").mkdir()
    messages = []
    dc.down("crashed", echo=messages.append)
    assert not state.exists()
    assert "no processes were running" in messages[0]
