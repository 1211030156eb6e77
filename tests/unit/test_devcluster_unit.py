"""Dev cluster pieces that need no running cluster: fleet files, build errors, the up lock."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest
from edgefleet_dev import toolchain as components
from edgefleet_dev.devcluster import cluster as dc
from edgefleet_dev.devcluster import fleet


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


# ---------------------------------------------------------------- the real node (no cluster, no root needed)


def test_machine_labels_follow_cpuinfo_and_the_profiles(tmp_path):
    from edgefleet_dev.devcluster import node

    (tmp_path / "p.yaml").write_text(textwrap.dedent("""
        spec:
          nodeSelector:
            matchLabels: {feature.node.kubernetes.io/cpu-cpuid.AVX512VNNI: "true", kubernetes.io/arch: amd64}
            matchExpressions: [{key: feature.node.kubernetes.io/cpu-cpuid.AMXBF16, operator: In, values: ["true"]}]
    """))
    with_vnni = node.machine_labels("flags\t\t: fpu sse avx512f avx512_vnni\n", tmp_path)
    assert with_vnni["feature.node.kubernetes.io/cpu-cpuid.AVX512VNNI"] == "true"
    assert "feature.node.kubernetes.io/cpu-cpuid.AMXBF16" not in with_vnni
    assert "kubernetes.io/arch" not in with_vnni  # the kubelet sets arch itself
    without = node.machine_labels("flags\t\t: fpu sse avx512f\n", tmp_path)
    assert not any(k.startswith(node.NFD_CPUID) for k in without)
    assert fleet.check_labels(with_vnni) == with_vnni  # valid Kubernetes labels


def test_oci_archive_is_a_consistent_image_layout(tmp_path):
    import gzip
    import hashlib
    import io
    import json
    import tarfile

    from edgefleet_dev.devcluster import node

    path = tmp_path / "img.tar"
    digest = node.write_oci_archive(path, "example.test/app:1", {"app": b"\x7fELF-not-really"}, ["/app"])
    with tarfile.open(path) as tar:
        blob = lambda d: tar.extractfile(f"blobs/sha256/{d.split(':')[1]}").read()  # noqa: E731
        index = json.load(tar.extractfile("index.json"))
        assert index["manifests"][0]["digest"] == digest
        assert index["manifests"][0]["annotations"]["io.containerd.image.name"] == "example.test/app:1"
        manifest_bytes = blob(digest)
        assert "sha256:" + hashlib.sha256(manifest_bytes).hexdigest() == digest
        manifest = json.loads(manifest_bytes)
        layer = blob(manifest["layers"][0]["digest"])
        config = json.loads(blob(manifest["config"]["digest"]))
    plain = gzip.decompress(layer)
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(plain).hexdigest()]
    assert config["config"]["Entrypoint"] == ["/app"]
    with tarfile.open(fileobj=io.BytesIO(plain)) as inner:
        member = inner.getmember("app")
        assert member.mode == 0o755 and member.uid == 0 and inner.extractfile(member).read() == b"\x7fELF-not-really"
    again = node.write_oci_archive(tmp_path / "again.tar", "example.test/app:1", {"app": b"\x7fELF-not-really"},
                                   ["/app"])
    assert again == digest  # reproducible


def test_missing_runc_names_the_install_command(tmp_path, monkeypatch):
    from edgefleet_dev.devcluster import node

    monkeypatch.setattr(node.os, "geteuid", lambda: 0)
    monkeypatch.setenv("PATH", str(tmp_path))
    reason = node.cannot_run()
    assert "runc" in reason and "iptables" in reason and node.INSTALL in reason


def test_real_node_configs_avoid_the_known_traps(tmp_path):
    import json
    import tomllib

    from edgefleet_dev.devcluster import node

    state = tmp_path / "clusters" / "x"
    config = tomllib.loads(node._containerd_config(state, "ghcr.io/edgefleet/pause:1"))
    assert config["version"] == 3
    runtime = config["plugins"]["io.containerd.cri.v1.runtime"]
    assert runtime["restrict_oom_score_adj"] is True  # no CAP_SYS_RESOURCE: "can't get final child's PID"
    assert runtime["netns_mounts_under_state_dir"] is True  # network namespaces go with the state directory
    images = config["plugins"]["io.containerd.cri.v1.images"]
    assert images["pinned_images"]["sandbox"] == "ghcr.io/edgefleet/pause:1"
    assert images["registry"]["config_path"].startswith(str(state))
    assert all(str(v).startswith(str(state)) for v in (config["root"], config["state"], config["grpc"]["address"]))
    kubelet = node._kubelet_config(state, {"kubelet": 1, "kubelet-healthz": 2})
    assert kubelet["failCgroupV1"] is False and kubelet["cgroupDriver"] == "cgroupfs"
    assert kubelet["address"] == node.NODE_IP and kubelet["authentication"]["anonymous"]["enabled"] is False
    cni = json.loads(node._cni_config(state))
    assert cni["plugins"][0]["ipMasq"] is False  # pods reach the node and each other, nothing else


def test_registry_hosts_make_the_dev_registry_plain_http(tmp_path):
    from edgefleet_dev.devcluster import node

    node._write_registry_hosts(tmp_path, 5123)
    for host in ("127.0.0.1:5123", f"{node.NODE_IP}:5123", "ghcr.io"):
        text = (tmp_path / "certs.d" / host / "hosts.toml").read_text()
        assert '[host."http://127.0.0.1:5123"]' in text


def test_a_stale_claim_does_not_block_a_new_real_node(tmp_path, monkeypatch):
    from edgefleet_dev.devcluster import node

    claim = tmp_path / "real-node"
    claim.write_text(str(tmp_path / "gone"))
    monkeypatch.setattr(node, "CLAIM", claim)
    assert node.claim_holder() is None


def _hello_recipe(tmp_path, monkeypatch, comp) -> None:
    recipe = tmp_path / "recipe" / "hello"
    for sub, word in (("", "hello"), ("world", "world")):
        (recipe / sub).mkdir(parents=True, exist_ok=True)
        (recipe / sub / "main.go").write_text(f'package main\n\nfunc main() {{ println("{word}") }}\n')
    (recipe / "go.mod").write_text("module example.test/hello\n\ngo 1.26.0\n")
    monkeypatch.setenv("EDGEFLEET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(components, "RECIPE", tmp_path / "recipe")
    monkeypatch.setattr(components, "COMPONENTS", {comp.name: comp})


@pytest.mark.skipif(not shutil.which("go"), reason="needs the Go toolchain")
def test_concurrent_builds_of_one_component_build_it_once(tmp_path, monkeypatch):
    _hello_recipe(tmp_path, monkeypatch, components.Component("hello", "v1", "hello", "example.test/hello"))
    messages: list[list[str]] = [[], []]
    with ThreadPoolExecutor(2) as pool:
        built = list(pool.map(lambda m: components.build_all(echo=m.append), messages))
    assert sorted(len(b) for b in built) == [0, 1]
    assert any("built meanwhile by another process" in line for m in messages for line in m)
    run = subprocess.run([str(components.binary_path("hello"))], capture_output=True, text=True)
    assert run.stderr == "hello\n"


@pytest.mark.skipif(not shutil.which("go"), reason="needs the Go toolchain")
def test_a_component_of_several_packages_is_a_folder_of_binaries(tmp_path, monkeypatch):
    comp = components.Component("pair", "v1", "hello", ("example.test/hello", "example.test/hello/world"),
                                tags=("no_such_tag",))
    _hello_recipe(tmp_path, monkeypatch, comp)
    components.build_all(echo=lambda _: None)
    folder = components.binary_path("pair")
    assert sorted(p.name for p in folder.iterdir()) == ["hello", "world"]
    assert subprocess.run([str(folder / "world")], capture_output=True, text=True).stderr == "world\n"
    assert "-tags no_such_tag" in (tmp_path / "cache" / "logs" / "build-pair-v1.log").read_text()


def test_stopping_a_stale_node_leaves_another_clusters_real_node_alone(tmp_path, monkeypatch):
    from edgefleet_dev.devcluster import node

    monkeypatch.setenv("EDGEFLEET_CACHE", str(tmp_path))
    mine, theirs = dc.state_dir("crashed"), dc.state_dir("running")
    (mine / "node").mkdir(parents=True)
    monkeypatch.setattr(node, "claim_holder", lambda: theirs)
    touched = []
    monkeypatch.setattr(node, "_clean_machine", lambda state: touched.append("machine") or [])
    monkeypatch.setattr(node, "_kill_pods", lambda: touched.append("pods") or 0)
    messages = []
    node.stop(mine, echo=messages.append)
    assert touched == [] and str(theirs) in messages[0]
    monkeypatch.setattr(node, "claim_holder", lambda: None)  # nobody's: a crashed node of our own is cleaned
    node.stop(mine, echo=messages.append)
    assert touched == ["pods", "machine"]


def test_up_with_the_real_node_pushes_built_images_or_says_why_not(monkeypatch, tmp_path):
    """`cluster up --real-node` pushes the built images to the cluster registry; unbuilt images or a refused push
    are said (with the command to run), never fatal to the node."""
    from types import SimpleNamespace

    from edgefleet_dev import stack
    from edgefleet_dev.devcluster import node
    from edgefleet_dev.images import oci
    from edgefleet_dev.images import sync as image_sync

    fake = SimpleNamespace(state=tmp_path / "mine", registry="127.0.0.1:5999")
    said: list[str] = []
    refreshed: list[tuple] = []  # the node's containerd is not started here: record what it would re-pull
    monkeypatch.setattr(node, "refresh_images", lambda state, refs: refreshed.append((state, refs)))
    monkeypatch.setattr(image_sync, "unbuilt", lambda: ["compiler"])
    assert stack.push_built_images(fake, said.append) == {}
    assert "images not built (compiler)" in said[-1] and "edgefleet images build" in said[-1]
    assert "`edgefleet cluster up --name mine --real-node`" in said[-1]

    pushed: list[str] = []
    monkeypatch.setattr(image_sync, "unbuilt", lambda: [])
    monkeypatch.setattr(image_sync, "sync", lambda dest, echo: pushed.append(dest) or {"operator": "sha256:aa"})
    assert stack.push_built_images(fake, said.append) == {"operator": "sha256:aa"}
    assert pushed == ["127.0.0.1:5999/edgefleet"] and "ghcr.io/edgefleet/<name>" in said[-1]
    assert refreshed == [(fake.state, [f"ghcr.io/edgefleet/operator:{stack.VERSION}"])]

    def refused(dest, echo):
        raise oci.PushError("registry said no")

    monkeypatch.setattr(image_sync, "sync", refused)
    assert stack.push_built_images(fake, said.append) == {}
    assert said[-1] == "could not push the built images to the cluster registry 127.0.0.1:5999: registry said no"


@pytest.mark.parametrize("stop", [True, False])
def test_session_cluster_started_for_a_session_is_stopped_unless_shared(monkeypatch, tmp_path, stop):
    """A shared cluster (named by EDGEFLEET_CLUSTER) that a session found down and started stays up: sessions that
    began meanwhile reuse it."""
    from edgefleet_dev import stack

    calls = []
    monkeypatch.setenv("EDGEFLEET_CLUSTER", "shared-x")
    monkeypatch.setattr(dc, "is_running", lambda name: False)
    monkeypatch.setattr(dc, "real_node_skip_reason", lambda name: "not here")
    monkeypatch.setattr(stack, "up", lambda name, echo, real_node: calls.append(("up", name)) or dc.Cluster(tmp_path))
    monkeypatch.setattr(dc, "down", lambda name: calls.append(("down", name)))
    with stack.session_cluster(echo=lambda _: None, stop=stop):
        assert calls == [("up", "shared-x")]
    assert calls == [("up", "shared-x")] + ([("down", "shared-x")] if stop else [])


def test_pids_in_cgroups_skips_a_cgroup_that_vanishes_during_the_walk(monkeypatch, tmp_path):
    from edgefleet_dev.devcluster import node

    root = tmp_path / "cpu" / node.CGROUP_ROOT
    for pod, pids in (("pod-a", "11\n12\n"), ("pod-b", "13\n")):
        (root / "kubepods" / pod / "c1").mkdir(parents=True)
        (root / "kubepods" / pod / "c1" / "cgroup.procs").write_text(pids)
    monkeypatch.setattr(node, "_cgroup_roots", lambda: [tmp_path / "cpu"])
    real_scandir = os.scandir

    def scandir(path):  # pod-b's cgroup goes away between listing its parent and entering it
        if str(path).endswith("pod-b"):
            shutil.rmtree(path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert node._pids_in_cgroups() == {11, 12}
