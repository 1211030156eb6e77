"""The node cache's CSI driver over its real gRPC socket: each namespace gets its own folder of the node cache,
owned by the runtime user; a pod cannot reach another namespace's folder or leave the cache. The bind mount is
real where this process may mount (root with CAP_SYS_ADMIN), else the test skips."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest
from edgefleet_runtime.cachedriver import DRIVER, CacheDriver, pb, serve

UID = 10001


def _call(channel: grpc.Channel, service: str, method: str, request, response: str):
    stub = channel.unary_unary(f"/{service}/{method}", request_serializer=lambda m: m.SerializeToString(),
                               response_deserializer=pb[response].FromString)
    return stub(request, timeout=10)


@pytest.fixture
def driver(tmp_path):
    sock = tmp_path / "csi.sock"
    root = tmp_path / "cache"
    server = serve(CacheDriver(root, UID, "node-1", str(sock)), [sock])
    channel = grpc.insecure_channel(f"unix://{sock}")
    yield channel, root, tmp_path
    channel.close()
    server.stop(0)


def publish(channel, target: Path, namespace: str | None, folder: str, readonly: bool = False):
    context = {"folder": folder, "csi.storage.k8s.io/ephemeral": "true"}
    if namespace is not None:
        context["csi.storage.k8s.io/pod.namespace"] = namespace
    request = pb["NodePublishVolumeRequest"](volume_id=f"csi-{target.name}", target_path=str(target),
                                             readonly=readonly, volume_context=context)
    return _call(channel, "csi.v1.Node", "NodePublishVolume", request, "NodePublishVolumeResponse")


def unpublish(channel, target: Path):
    request = pb["NodeUnpublishVolumeRequest"](volume_id=f"csi-{target.name}", target_path=str(target))
    return _call(channel, "csi.v1.Node", "NodeUnpublishVolume", request, "NodeUnpublishVolumeResponse")


def test_identity_and_registration_answer_as_the_kubelet_expects(driver):
    channel, _, _ = driver
    info = _call(channel, "csi.v1.Identity", "GetPluginInfo", pb["GetPluginInfoRequest"](), "GetPluginInfoResponse")
    assert info.name == DRIVER
    node = _call(channel, "csi.v1.Node", "NodeGetInfo", pb["NodeGetInfoRequest"](), "NodeGetInfoResponse")
    assert node.node_id == "node-1"
    reg = _call(channel, "pluginregistration.Registration", "GetInfo", pb["InfoRequest"](), "PluginInfo")
    assert (reg.type, reg.name, list(reg.supported_versions)) == ("CSIPlugin", DRIVER, ["1.0.0"])
    assert reg.endpoint.endswith("csi.sock")


@pytest.mark.parametrize(("namespace", "folder", "message"), [
    (None, "models", "podInfoOnMount"),  # the kubelet did not say whose pod it is: never guess
    ("t", "../other/models", "volumeAttributes.folder"),
    ("t", "models/../../b", "volumeAttributes.folder"),
    ("t", "/abs", "volumeAttributes.folder"),
    ("t", "", "volumeAttributes.folder"),
    ("../b", "models", "podInfoOnMount"),
])
def test_tenant_publish_refuses_requests_that_would_leave_the_namespace(driver, namespace, folder, message):
    channel, root, tmp_path = driver
    with pytest.raises(grpc.RpcError) as err:
        publish(channel, tmp_path / "pod" / "mount", namespace, folder)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()
    assert not (root / "b").exists() and not (root / "other").exists() and not (tmp_path / "b").exists()


def test_tenant_namespaces_get_separate_folders_owned_by_the_runtime_user(driver):
    channel, root, tmp_path = driver
    a, b = tmp_path / "pod-a" / "mount", tmp_path / "pod-b" / "mount"
    try:
        publish(channel, a, "team-a", "hard-examples/digits")
    except grpc.RpcError as err:
        if "Operation not permitted" in (err.details() or ""):
            pytest.skip("this process may not bind-mount (needs CAP_SYS_ADMIN)")
        raise
    try:
        publish(channel, b, "team-b", "hard-examples/digits")
        (a / "example.npz").write_bytes(b"team-a's input")
        assert (root / "namespaces/team-a/hard-examples/digits/example.npz").read_bytes() == b"team-a's input"
        assert list(b.iterdir()) == []  # the same folder name in another namespace is another folder
        for folder in ("team-a", "team-a/hard-examples", "team-a/hard-examples/digits"):
            st = (root / "namespaces" / folder).stat()
            assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (UID, UID, 0o750), folder
        assert (root / "namespaces").stat().st_mode & 0o777 == 0o711  # nobody lists the namespaces
        publish(channel, a, "team-a", "hard-examples/digits")  # the kubelet retries: idempotent
    finally:
        unpublish(channel, a)
        unpublish(channel, b)
    assert not a.exists() and not os.path.ismount(b)
    assert (root / "namespaces/team-a/hard-examples/digits/example.npz").exists()  # the cache outlives the pod


def test_tenant_read_only_publish_cannot_be_written(driver):
    channel, root, tmp_path = driver
    target = tmp_path / "pod" / "mount"
    try:
        publish(channel, target, "team-a", "models", readonly=True)
    except grpc.RpcError as err:
        if "Operation not permitted" in (err.details() or ""):
            pytest.skip("this process may not bind-mount (needs CAP_SYS_ADMIN)")
        raise
    try:
        with pytest.raises(OSError):
            (target / "x").write_bytes(b"x")
    finally:
        unpublish(channel, target)
