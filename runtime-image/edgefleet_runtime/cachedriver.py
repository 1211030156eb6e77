"""The node cache as a CSI driver (cache.edgefleet.io): each namespace gets its own folder of the node's cache.

Runtime pods name a CSI ephemeral volume of this driver with one attribute, `folder` (e.g. `models`). The kubelet
adds the pod's namespace (the CSIDriver has podInfoOnMount; the kubelet's keys override any the pod sets), and
the driver bind-mounts ROOT/namespaces/<namespace>/<folder>, made on first use and owned by the runtime user, at
the pod's volume path. A pod therefore sees only its own namespace's variants and hard examples, the cache
survives pod restarts, and no pod in a tenant's namespace needs a hostPath or a root container (Pod Security
`restricted` admits csi volumes). The driver runs in the operator's namespace (chart: nodeCache), the one place
with the host access this needs.

gRPC without generated code, as grpcserver does: the few CSI (csi.v1) and kubelet plugin-registration
(pluginregistration) messages used are declared here; fields not declared are skipped when parsing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

log = logging.getLogger(__name__)
DRIVER = "cache.edgefleet.io"
VERSION = "0.1.0"
NAMESPACE_KEY = "csi.storage.k8s.io/pod.namespace"
EPHEMERAL_KEY = "csi.storage.k8s.io/ephemeral"
NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
SEGMENT = re.compile(r"^[a-z0-9]([-a-z0-9._]{0,251}[a-z0-9])?$")
MAX_SEGMENTS = 4
F = descriptor_pb2.FieldDescriptorProto
_STRING, _BOOL = F.TYPE_STRING, F.TYPE_BOOL

# package -> message -> [(field, number, type or "map" or "repeated string")]
MESSAGES: dict[str, dict[str, list[tuple[str, int, object]]]] = {
    "csi.v1": {
        "GetPluginInfoRequest": [], "GetPluginInfoResponse": [("name", 1, _STRING), ("vendor_version", 2, _STRING)],
        "GetPluginCapabilitiesRequest": [], "GetPluginCapabilitiesResponse": [],
        "ProbeRequest": [], "ProbeResponse": [],
        "NodeGetCapabilitiesRequest": [], "NodeGetCapabilitiesResponse": [],
        "NodeGetInfoRequest": [], "NodeGetInfoResponse": [("node_id", 1, _STRING)],
        "NodePublishVolumeRequest": [("volume_id", 1, _STRING), ("target_path", 4, _STRING), ("readonly", 6, _BOOL),
                                     ("volume_context", 8, "map")],
        "NodePublishVolumeResponse": [],
        "NodeUnpublishVolumeRequest": [("volume_id", 1, _STRING), ("target_path", 2, _STRING)],
        "NodeUnpublishVolumeResponse": [],
    },
    "pluginregistration": {
        "InfoRequest": [], "PluginInfo": [("type", 1, _STRING), ("name", 2, _STRING), ("endpoint", 3, _STRING),
                                          ("supported_versions", 4, "repeated string")],
        "RegistrationStatus": [("plugin_registered", 1, _BOOL), ("error", 2, _STRING)],
        "RegistrationStatusResponse": [],
    },
}  # fmt: skip


def _file(package: str) -> descriptor_pb2.FileDescriptorProto:
    fd = descriptor_pb2.FileDescriptorProto(name=f"edgefleet_{package}.proto", package=package, syntax="proto3")
    for name, fields in MESSAGES[package].items():
        msg = fd.message_type.add(name=name)
        for field, number, kind in fields:
            f = msg.field.add(name=field, number=number, label=F.LABEL_OPTIONAL)
            if kind == "map":  # map<string, string>: a repeated nested entry message
                entry = msg.nested_type.add(name="".join(p.title() for p in field.split("_")) + "Entry")
                entry.options.map_entry = True
                entry.field.add(name="key", number=1, label=F.LABEL_OPTIONAL, type=_STRING)
                entry.field.add(name="value", number=2, label=F.LABEL_OPTIONAL, type=_STRING)
                f.label, f.type, f.type_name = F.LABEL_REPEATED, F.TYPE_MESSAGE, f".{package}.{name}.{entry.name}"
            elif kind == "repeated string":
                f.label, f.type = F.LABEL_REPEATED, _STRING
            else:
                f.type = kind  # type: ignore[assignment]
    return fd


POOL = descriptor_pool.DescriptorPool()
pb: dict[str, Any] = {}  # message name -> message class
for _package in MESSAGES:
    POOL.Add(_file(_package))
    for _name in MESSAGES[_package]:
        pb[_name] = message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"{_package}.{_name}"))


class Refused(ValueError):
    """A publish request the driver will not serve; the message names what and why."""


def source_folder(root: Path, context: dict[str, str]) -> Path:
    """ROOT/namespaces/<the pod's namespace>/<folder> for a publish request's volume context."""
    namespace = context.get(NAMESPACE_KEY, "")
    if not NAMESPACE.match(namespace):
        raise Refused(f"no pod namespace in the volume context ({NAMESPACE_KEY}): the CSIDriver {DRIVER} must have "
                      "podInfoOnMount: true (the chart sets it)")
    if context.get(EPHEMERAL_KEY) != "true":
        raise Refused(f"{DRIVER} serves CSI ephemeral (inline) volumes only; use a csi volume in the pod spec")
    folder = context.get("folder", "")
    parts = folder.split("/")
    if not folder or len(parts) > MAX_SEGMENTS or not all(SEGMENT.match(p) and ".." not in p for p in parts):
        raise Refused(f"volumeAttributes.folder {folder!r}: give a relative path of at most {MAX_SEGMENTS} "
                      "lowercase names, e.g. models or hard-examples/digits")
    return root / "namespaces" / namespace / folder


def prepare(root: Path, folder: Path, uid: int) -> None:
    """Make `folder` and the folders between it and ROOT/namespaces, owned by uid:uid, mode 0750 (the pods run
    as uid with fsGroup uid); ROOT and ROOT/namespaces stay root's, 0711: nobody lists the namespaces."""
    for top in (root, root / "namespaces"):
        top.mkdir(mode=0o711, exist_ok=True)
        os.chmod(top, 0o711)
    current = root / "namespaces"
    for part in folder.relative_to(current).parts:
        current = current / part
        if current.is_symlink():
            raise Refused(f"{current} is a symbolic link; the node cache holds none: remove it")
        current.mkdir(mode=0o750, exist_ok=True)
        os.chown(current, uid, uid, follow_symlinks=False)


_MS_RDONLY, _MS_REMOUNT, _MS_BIND = 1, 32, 4096
_libc = ctypes.CDLL(None, use_errno=True)


def bind_mount(source: Path, target: Path, readonly: bool) -> None:
    """mount --bind source target (then read-only when asked)."""
    calls = [(_MS_BIND, str(source))] + ([(_MS_BIND | _MS_REMOUNT | _MS_RDONLY, "none")] if readonly else [])
    for flags, src in calls:
        if _libc.mount(src.encode(), str(target).encode(), None, flags, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mount {source} at {target}: {os.strerror(err)}")


def is_mountpoint(path: Path) -> bool:
    """Whether a mount sits at `path` (a bind mount from the same filesystem too, which os.path.ismount misses)."""
    wanted = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        points = {line.split()[4].encode().decode("unicode_escape") for line in f}
    return wanted in points


def unmount(target: Path) -> None:
    while is_mountpoint(target):  # a mount made twice (a retried publish) needs two unmounts
        if _libc.umount2(str(target).encode(), 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"unmount {target}: {os.strerror(err)}")


class CacheDriver:
    """The Identity and Node services of the CSI driver, and the kubelet's plugin registration."""

    def __init__(self, root: Path, uid: int, node: str, endpoint: str,
                 mount: Callable[[Path, Path, bool], None] = bind_mount,
                 umount: Callable[[Path], None] = unmount) -> None:
        self.root, self.uid, self.node, self.endpoint = root, uid, node, endpoint
        self.mount, self.umount = mount, umount
        self.lock = threading.Lock()

    def publish(self, request, context):
        target = Path(request.target_path)
        try:
            source = source_folder(self.root, dict(request.volume_context))
            with self.lock:
                prepare(self.root, source, self.uid)
                target.mkdir(parents=True, exist_ok=True)
                if not is_mountpoint(target):
                    self.mount(source, target, request.readonly)
        except Refused as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except OSError as err:
            context.abort(grpc.StatusCode.INTERNAL, str(err))
        log.info("published %s at %s", source, target)
        return pb["NodePublishVolumeResponse"]()

    def unpublish(self, request, context):
        target = Path(request.target_path)
        try:
            with self.lock:
                self.umount(target)
                if target.is_dir():
                    target.rmdir()
        except OSError as err:
            context.abort(grpc.StatusCode.INTERNAL, str(err))
        return pb["NodeUnpublishVolumeResponse"]()

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        def empty(name: str) -> Callable:
            return lambda request, context: pb[name]()

        services = {
            "csi.v1.Identity": {
                "GetPluginInfo": (lambda r, c: pb["GetPluginInfoResponse"](name=DRIVER, vendor_version=VERSION),
                                  "GetPluginInfoRequest"),
                "GetPluginCapabilities": (empty("GetPluginCapabilitiesResponse"), "GetPluginCapabilitiesRequest"),
                "Probe": (empty("ProbeResponse"), "ProbeRequest")},
            "csi.v1.Node": {
                "NodeGetCapabilities": (empty("NodeGetCapabilitiesResponse"), "NodeGetCapabilitiesRequest"),
                "NodeGetInfo": (lambda r, c: pb["NodeGetInfoResponse"](node_id=self.node), "NodeGetInfoRequest"),
                "NodePublishVolume": (self.publish, "NodePublishVolumeRequest"),
                "NodeUnpublishVolume": (self.unpublish, "NodeUnpublishVolumeRequest")},
            "pluginregistration.Registration": {
                "GetInfo": (lambda r, c: pb["PluginInfo"](type="CSIPlugin", name=DRIVER, endpoint=self.endpoint,
                                                          supported_versions=["1.0.0"]), "InfoRequest"),
                "NotifyRegistrationStatus": (self._registered, "RegistrationStatus")},
        }
        return [grpc.method_handlers_generic_handler(service, {
            method: grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=pb[req].FromString, response_serializer=lambda m: m.SerializeToString())
            for method, (fn, req) in methods.items()}) for service, methods in services.items()]

    def _registered(self, request, context):
        if request.plugin_registered:
            log.info("the kubelet registered %s", DRIVER)
        else:
            log.error("the kubelet refused %s: %s", DRIVER, request.error)
        return pb["RegistrationStatusResponse"]()


def serve(driver: CacheDriver, sockets: list[Path]) -> grpc.Server:
    """Start the services on each unix socket (the CSI endpoint, the registration socket); returns the server."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers(driver.handlers())
    for sock in sockets:
        sock.parent.mkdir(parents=True, exist_ok=True)
        sock.unlink(missing_ok=True)
        server.add_insecure_port(f"unix://{sock}")
    server.start()
    return server


def run(root: str, uid: int, node: str, csi_socket: str, registration_socket: str) -> int:
    """The driver's process (the chart's node cache DaemonSet): serve until terminated."""
    driver = CacheDriver(Path(root), uid, node, csi_socket)
    server = serve(driver, [Path(csi_socket), Path(registration_socket)])
    log.info("%s serving %s on %s for node %s", DRIVER, root, csi_socket, node)
    server.wait_for_termination()
    return 0
