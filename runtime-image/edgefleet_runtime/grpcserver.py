"""Open Inference Protocol v2 over gRPC: ``inference.GRPCInferenceService`` as KServe and Triton serve it.

``InferenceService`` (the methods) and the message classes serve both transports: ``grpch2`` (the default, unary
HTTP/2 on the REST server's thread model) and ``GRPCServer`` below, grpcio's sync server (``--grpc-server
grpcio``). The limits described at the end of this docstring are the grpcio server's; ``grpch2`` lists its own.

A thin adapter over the data plane (``dataplane``): ModelInferRequest -> ``InferRequest`` (with the tensor checks
REST uses, from ``tensors``), ``DataPlane.infer``, ``InferResponse`` -> ModelInferResponse.
Served: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer
(typed ``contents`` or ``raw_input_contents``; outputs always as ``raw_output_contents``). Other methods
answer UNIMPLEMENTED.

No generated code: the messages are described below in Python (field numbers and types as in KServe's
``open_inference_grpc.proto`` / Triton's ``grpc_service.proto``; tests compare them with tritonclient's)
and built into a private descriptor pool at import. That keeps the runtime free of a protoc step and of
the pinning between generated ``_pb2`` files and the protobuf runtime.

Limits, as for REST: messages over the model's body limit are refused (RESOURCE_EXHAUSTED) before they
are parsed, messages over ``max_body_bytes`` are refused by gRPC itself while arriving (counted as
``grpc_message_refused``), calls beyond grpcio's own queue bound are refused by it (``grpc_queue_full``),
infer calls beyond ``max_concurrency`` get UNAVAILABLE with a retry hint, idle connections close after
``idle_seconds``, a connection must finish its HTTP/2 handshake within ``header_seconds``. gRPC's core polls connections
without a thread each, so there is no connection cap to evict from; 64 streams per connection.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import types
from collections.abc import Callable
from concurrent import futures
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from . import __version__
from .backends import NP_TO_OIP, TensorSpec
from .budget import Lease
from .dataplane import DataPlane, InferRequest, InferResponse, LoadedModel, RequestedOutput
from .tensors import (
    BYTES_ELEMENT_COST,
    MemoryRefused,
    RequestError,
    charge,
    check_finite,
    check_missing,
    check_outputs,
    check_tensor,
    decode_bytes_tensor,
    tensor_to_binary,
)

if TYPE_CHECKING:
    from .config import Limits

Message = Any  # a message class built from POOL at import: its fields are unknown to a type checker
Context = Any  # grpc.ServicerContext (grpcio ships no type hints)
Behavior = Callable[[Any, Context], Any]

log = logging.getLogger("edgefleet_runtime.grpc")

SERVICE = "inference.GRPCInferenceService"
F = descriptor_pb2.FieldDescriptorProto
_TYPES = {
    "bool": F.TYPE_BOOL, "string": F.TYPE_STRING, "bytes": F.TYPE_BYTES, "int32": F.TYPE_INT32,
    "int64": F.TYPE_INT64, "uint32": F.TYPE_UINT32, "uint64": F.TYPE_UINT64, "float": F.TYPE_FLOAT,
    "double": F.TYPE_DOUBLE,
}  # fmt: skip
_PARAMS = ("parameters", 4, "map", ".inference.InferParameter")
_CONTENTS_TYPE = ".inference.InferTensorContents"
_TENSOR = [("name", 1, "string"), ("datatype", 2, "string"), ("shape", 3, "repeated int64")]
# message name -> fields (name, number, type[, message type]); nested messages as "Outer.Inner"
MESSAGES: dict[str, list[tuple[Any, ...]]] = {
    "ServerLiveRequest": [],
    "ServerLiveResponse": [("live", 1, "bool")],
    "ServerReadyRequest": [],
    "ServerReadyResponse": [("ready", 1, "bool")],
    "ModelReadyRequest": [("name", 1, "string"), ("version", 2, "string")],
    "ModelReadyResponse": [("ready", 1, "bool")],
    "ServerMetadataRequest": [],
    "ServerMetadataResponse": [
        ("name", 1, "string"), ("version", 2, "string"), ("extensions", 3, "repeated string"),
    ],
    "ModelMetadataRequest": [("name", 1, "string"), ("version", 2, "string")],
    "ModelMetadataResponse": [
        ("name", 1, "string"), ("versions", 2, "repeated string"), ("platform", 3, "string"),
        ("inputs", 4, "repeated", ".inference.ModelMetadataResponse.TensorMetadata"),
        ("outputs", 5, "repeated", ".inference.ModelMetadataResponse.TensorMetadata"),
    ],
    "ModelMetadataResponse.TensorMetadata": _TENSOR,
    "InferParameter": [
        ("bool_param", 1, "oneof bool"), ("int64_param", 2, "oneof int64"), ("string_param", 3, "oneof string"),
        ("double_param", 4, "oneof double"), ("uint64_param", 5, "oneof uint64"),
    ],
    "InferTensorContents": [
        ("bool_contents", 1, "repeated bool"), ("int_contents", 2, "repeated int32"),
        ("int64_contents", 3, "repeated int64"), ("uint_contents", 4, "repeated uint32"),
        ("uint64_contents", 5, "repeated uint64"), ("fp32_contents", 6, "repeated float"),
        ("fp64_contents", 7, "repeated double"), ("bytes_contents", 8, "repeated bytes"),
    ],
    "ModelInferRequest": [
        ("model_name", 1, "string"), ("model_version", 2, "string"), ("id", 3, "string"), _PARAMS,
        ("inputs", 5, "repeated", ".inference.ModelInferRequest.InferInputTensor"),
        ("outputs", 6, "repeated", ".inference.ModelInferRequest.InferRequestedOutputTensor"),
        ("raw_input_contents", 7, "repeated bytes"),
    ],
    "ModelInferRequest.InferInputTensor": [*_TENSOR, _PARAMS, ("contents", 5, "message", _CONTENTS_TYPE)],
    "ModelInferRequest.InferRequestedOutputTensor": [
        ("name", 1, "string"), ("parameters", 2, "map", ".inference.InferParameter"),
    ],
    "ModelInferResponse": [
        ("model_name", 1, "string"), ("model_version", 2, "string"), ("id", 3, "string"), _PARAMS,
        ("outputs", 5, "repeated", ".inference.ModelInferResponse.InferOutputTensor"),
        ("raw_output_contents", 6, "repeated bytes"),
    ],
    "ModelInferResponse.InferOutputTensor": [*_TENSOR, _PARAMS, ("contents", 5, "message", _CONTENTS_TYPE)],
}  # fmt: skip


def _add_field(msg: descriptor_pb2.DescriptorProto, spec: tuple[Any, ...]) -> None:
    name, number, kind = spec[:3]
    f = msg.field.add(name=name, number=number, label=F.LABEL_OPTIONAL)
    words = kind.split()
    if words[0] == "repeated":
        f.label = F.LABEL_REPEATED
        words = words[1:]
    if words and words[0] == "oneof":
        if not msg.oneof_decl:
            msg.oneof_decl.add(name="parameter_choice")
        f.oneof_index = 0
        words = words[1:]
    if words == ["map"]:  # map<string, InferParameter>: a repeated nested entry message
        entry = msg.nested_type.add(name="".join(p.title() for p in name.split("_")) + "Entry")
        entry.options.map_entry = True
        entry.field.add(name="key", number=1, label=F.LABEL_OPTIONAL, type=F.TYPE_STRING)
        entry.field.add(name="value", number=2, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE, type_name=spec[3])
        f.label, f.type, f.type_name = F.LABEL_REPEATED, F.TYPE_MESSAGE, entry.name
    elif words in ([], ["message"]):
        f.type, f.type_name = F.TYPE_MESSAGE, spec[3]
    else:
        f.type = _TYPES[words[0]]


def _file() -> descriptor_pb2.FileDescriptorProto:
    fd = descriptor_pb2.FileDescriptorProto(name="edgefleet_oip.proto", package="inference", syntax="proto3")
    tops: dict[str, descriptor_pb2.DescriptorProto] = {}
    for full, fields in MESSAGES.items():
        outer, _, inner = full.partition(".")
        if not inner:
            msg = tops[outer] = fd.message_type.add(name=outer)
        else:
            msg = tops[outer].nested_type.add(name=inner)
        for spec in fields:
            _add_field(msg, spec)
    for msg in fd.message_type:  # map entry type names are relative to the message that holds them
        _qualify(msg, ".inference." + msg.name)
    return fd


def _qualify(msg: descriptor_pb2.DescriptorProto, prefix: str) -> None:
    for f in msg.field:
        if f.type == F.TYPE_MESSAGE and not f.type_name.startswith("."):
            f.type_name = f"{prefix}.{f.type_name}"
    for nested in msg.nested_type:
        _qualify(nested, f"{prefix}.{nested.name}")


POOL = descriptor_pool.DescriptorPool()
POOL.Add(_file())
pb = types.SimpleNamespace()  # pb.ModelInferRequest, ... : message classes by name
for _name in MESSAGES:
    if "." not in _name:
        setattr(pb, _name, message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"inference.{_name}")))

_CONTENTS = {  # datatype -> the InferTensorContents field that carries it
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}  # fmt: skip
_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND, 405: grpc.StatusCode.UNIMPLEMENTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE,
}  # fmt: skip


LOOKAHEAD_BYTES = 64 << 10  # what a stream may send before its call reads (HTTP/2 window)
MESSAGE_EXPANSION = 2  # a message in memory: its bytes and the parsed message beside them
MESSAGE_RECEIVE_COST = 3  # while it arrives: gRPC's buffer, then our bytes, then the parsed message


def decode_request(req: Message, model: LoadedModel, lease: Lease | None = None) -> InferRequest:
    """A ModelInferRequest as the data plane's request, with the same checks and messages as REST; decoded
    BYTES are charged to ``lease``. Encoded images (BYTES) for the input of the model's declared pre-processing
    are left to the data plane, as REST's."""
    if not req.inputs:
        raise RequestError(400, "field 'inputs' must be a non-empty list of tensors")
    raw = req.raw_input_contents
    if raw and len(raw) != len(req.inputs):
        raise RequestError(
            400, f"raw_input_contents has {len(raw)} entries for {len(req.inputs)} inputs; give one per input"
        )
    feeds: dict[str, np.ndarray] = {}
    for i, t in enumerate(req.inputs):
        shape = list(t.shape)
        spec, count = check_tensor(t.name, t.datatype, shape, model.name, model.inputs, feeds, model.encoded)
        arr = _raw_tensor(t.name, raw[i], spec, count, lease) if raw else _typed_tensor(t, spec, count, lease)
        feeds[t.name] = arr.reshape(shape)
    check_missing(model.name, model.inputs, feeds)
    names = check_outputs([o.name for o in req.outputs], model.name, model.outputs) or list(model.outputs)
    return InferRequest(model, feeds, [RequestedOutput(n) for n in names], req.id)


def _raw_tensor(name: str, buf: bytes, spec: TensorSpec, count: int, lease: Lease | None) -> np.ndarray:
    if spec.datatype == "BYTES":
        return decode_bytes_tensor(memoryview(buf), count, name, lease)
    want = count * spec.dtype.itemsize
    if len(buf) != want:
        raise RequestError(
            400, f"input '{name}': raw_input_contents has {len(buf)} bytes; shape and {spec.datatype} need {want}"
        )
    return check_finite(name, np.frombuffer(buf, dtype=spec.dtype.newbyteorder("<")), spec.datatype)


def _typed_tensor(t: Message, spec: TensorSpec, count: int, lease: Lease | None) -> np.ndarray:
    field = _CONTENTS.get(spec.datatype)
    if field is None:
        raise RequestError(400, f"input '{t.name}': {spec.datatype} has no typed contents; send raw_input_contents")
    values = getattr(t.contents, field)
    if len(values) != count:
        raise RequestError(
            400, f"input '{t.name}': contents.{field} has {len(values)} values but the shape needs {count}"
        )
    if spec.datatype == "BYTES":
        charge(lease, count * BYTES_ELEMENT_COST, f"input '{t.name}' ({count} BYTES elements decoded)")
        return np.array(list(values), dtype=object)
    arr = np.asarray(values)
    if spec.dtype.kind in "iu" and arr.size:
        info = np.iinfo(spec.dtype)
        if arr.min() < info.min or arr.max() > info.max:
            raise RequestError(400, f"input '{t.name}': values outside {spec.datatype}'s range")
    return check_finite(t.name, arr.astype(spec.dtype, copy=False), spec.datatype)


def encode_response(resp: InferResponse) -> Message:
    """The data plane's response as a ModelInferResponse: every output as raw_output_contents."""
    out = pb.ModelInferResponse(model_name=resp.model_name, model_version=resp.model_version, id=resp.id or "")
    for o in resp.outputs:
        datatype = NP_TO_OIP.get(o.data.dtype, "BYTES")
        out.outputs.add(name=o.name, datatype=datatype, shape=o.data.shape)
        out.raw_output_contents.append(tensor_to_binary(o.data, datatype))
    return out


class InferenceService:
    """The service's methods over ``plane``, the data plane REST serves too (one model slot, one set of metrics)."""

    def __init__(self, plane: DataPlane, limits: Limits):
        self.plane = plane
        self.limits = limits
        self._running = 0
        self._lock = threading.Lock()

    def _fail(self, context: Context, e: RequestError) -> NoReturn:
        self.plane.metrics.count("grpc", e.status)
        if isinstance(e, MemoryRefused):
            self.plane.metrics.count_refused("memory_budget")
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, e.message)
        context.abort(_CODES.get(e.status, grpc.StatusCode.INTERNAL), e.message)
        raise AssertionError("context.abort raises")  # grpcio's abort never returns

    def ServerLive(self, request: Message, context: Context) -> Message:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: Message, context: Context) -> Message:
        return pb.ServerReadyResponse(ready=self.plane.ready)

    def ModelReady(self, request: Message, context: Context) -> Message:
        try:
            self.plane.model(request.name, request.version)
        except RequestError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.plane.ready)

    def ServerMetadata(self, request: Message, context: Context) -> Message:
        return pb.ServerMetadataResponse(
            name="edgefleet-runtime", version=__version__, extensions=["binary_tensor_data"]
        )

    def ModelMetadata(self, request: Message, context: Context) -> Message:
        try:
            m = self.plane.model(request.name, request.version)
        except RequestError as e:
            return self._fail(context, e)
        resp = pb.ModelMetadataResponse(name=m.name, versions=[m.version], platform=m.backend.platform)
        for src, dst in ((m.inputs, resp.inputs), (m.outputs, resp.outputs)):
            for t in src.values():
                dst.add(name=t.name, datatype=t.datatype, shape=t.shape)
        return resp

    def ModelInfer(self, raw: bytes | bytearray, context: Context, lease: Lease | None = None) -> Message:
        """``raw`` is the undecoded message: its size is checked against the model's limit before parsing.
        ``lease``: the transport charged the message to the memory budget already (``grpch2``)."""
        with self._lock:
            over = self._running >= self.limits.max_concurrency
            if not over:
                self._running += 1
        if over:
            self.plane.metrics.count_refused("concurrency")
            context.set_trailing_metadata((("retry-after", "1"),))
            return self._fail(context, RequestError(503, "the server is at its concurrency limit; retry after 1 s"))
        try:
            return self._infer(raw, lease)
        except RequestError as e:
            return self._fail(context, e)
        finally:
            with self._lock:
                self._running -= 1

    def _infer(self, raw: bytes | bytearray, held: Lease | None) -> Message:
        t0 = time.perf_counter()
        current = self.plane.slot.current
        limit = min(self.limits.max_body_bytes, (current.body_limit if current else None) or math.inf)
        if len(raw) > limit:
            self.plane.metrics.count_refused("body_too_large")
            raise RequestError(413, f"message of {len(raw)} bytes is over the limit of {limit} bytes (what the "
                                    "model's inputs can need at --max-batch, capped by --max-body-bytes)")
        with held or self.plane.lease() as lease:
            if held is None:
                charge(lease, len(raw) * MESSAGE_EXPANSION, f"a message of {len(raw)} bytes")
            try:
                req = pb.ModelInferRequest.FromString(raw)
            except Exception:  # noqa: BLE001 - protobuf's DecodeError differs between its implementations
                raise RequestError(400, "malformed ModelInferRequest message") from None
            model = self.plane.model(req.model_name, req.model_version)
            resp = encode_response(self.plane.infer(decode_request(req, model, lease), lease))
        self.plane.metrics.count("grpc", 200)
        self.plane.metrics.latency.observe(time.perf_counter() - t0)
        return resp


_reached = threading.local()  # .value: this pool thread's call got as far as our method


def _reaching(behavior: Behavior) -> Behavior:
    def run(request: Any, context: Context) -> Any:
        _reached.value = True
        return behavior(request, context)

    return run


class _Pool(futures.ThreadPoolExecutor):
    """grpcio hands each call to this pool before its message arrives. A call that ends without reaching our
    method is counted as ``grpc_message_refused``: gRPC itself refused its message (over
    ``grpc.max_receive_message_length``, i.e. --max-body-bytes), could not parse it, or its client went away
    before sending it."""

    def __init__(self, refused: Callable[[str], None], **kwargs: Any):
        super().__init__(**kwargs)
        self.refused = refused

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        return super().submit(self._watched, fn, *args, **kwargs)

    def _watched(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        _reached.value = False
        try:
            return fn(*args, **kwargs)
        finally:
            if not _reached.value:
                self.refused("grpc_message_refused")


class _Handler(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpcio ships no type hints
    """The service's methods. grpcio asks for them at the start of every call, just before it checks its own
    limit on calls in progress (``maximum_concurrent_rpcs``), under the same lock: a call over that limit is
    counted here as ``grpc_queue_full`` (grpcio answers it RESOURCE_EXHAUSTED without calling us)."""

    def __init__(self, methods: dict[str, Any], refused: Callable[[str], None]):
        self.methods = methods
        self.refused = refused
        self.server: Any = None  # set once the grpc server exists

    def service(self, handler_call_details: Any) -> Any:
        state = getattr(self.server, "_state", None)  # grpcio's own bookkeeping (private; absent: no count)
        limit = getattr(state, "maximum_concurrent_rpcs", None)
        if limit is not None and getattr(state, "active_rpc_count", 0) >= limit:
            self.refused("grpc_queue_full")
        return self.methods.get(handler_call_details.method)


def _handler(service: InferenceService) -> _Handler:
    def unary(method: str, request_type: Any, response_type: Any = None, raw: bool = False) -> Any:
        return grpc.unary_unary_rpc_method_handler(
            _reaching(getattr(service, method)),
            request_deserializer=None if raw else request_type.FromString,
            response_serializer=(response_type or request_type).SerializeToString,
        )

    methods = {
        f"/{SERVICE}/{name}": handler
        for name, handler in {
            "ServerLive": unary("ServerLive", pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": unary("ServerReady", pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ModelReady": unary("ModelReady", pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ServerMetadata": unary("ServerMetadata", pb.ServerMetadataRequest, pb.ServerMetadataResponse),
            "ModelMetadata": unary("ModelMetadata", pb.ModelMetadataRequest, pb.ModelMetadataResponse),
            "ModelInfer": unary("ModelInfer", None, pb.ModelInferResponse, raw=True),
        }.items()
    }
    return _Handler(methods, service.plane.metrics.count_refused)


def message_limit(plane: DataPlane, limits: Limits) -> int:
    """gRPC's own limit on a message (it refuses larger ones while they arrive): what the model served at start-up
    can need (``LoadedModel.body_limit``), capped by --max-body-bytes. A model swapped in later whose inputs need
    more is served larger messages only after a restart (the refusal says so)."""
    current = plane.slot.current
    return min(limits.max_body_bytes, (current.body_limit if current else None) or limits.max_body_bytes)


def receivers(limits: Limits, largest: int) -> int:
    """Pool threads: calls whose messages gRPC takes in at once (a call waiting for a thread is held back by HTTP/2
    flow control), a few beyond the concurrency limit so that refusals are answered, not queued; at most as many
    as the memory budget holds messages of the ``largest`` size while they arrive (MESSAGE_RECEIVE_COST each)."""
    fit = limits.body_budget_bytes // max(1, largest * MESSAGE_RECEIVE_COST)
    return max(2, min(limits.max_concurrency + 4, fit))


class GRPCServer:
    def __init__(self, plane: DataPlane, host: str, port: int, limits: Limits):
        self.service = InferenceService(plane, limits)
        largest = message_limit(plane, limits)
        options = [
            ("grpc.max_receive_message_length", largest),
            ("grpc.max_send_message_length", -1),
            ("grpc.max_concurrent_streams", 64),
            ("grpc.max_connection_idle_ms", int(limits.idle_seconds * 1000)),
            ("grpc.server_handshake_timeout_ms", int(limits.header_seconds * 1000)),
            ("grpc.http2.max_ping_strikes", 2),
            # a message is taken in only while a pool thread waits for it: without a read, a stream's window stays
            # small (no BDP growth), so calls queued for a thread hold back their messages instead of buffering them
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", LOOKAHEAD_BYTES),
            ("grpc.so_reuseport", 0),
        ]
        workers = receivers(limits, largest)
        handler = _handler(self.service)
        self.server = grpc.server(
            _Pool(handler.refused, max_workers=workers, thread_name_prefix="grpc"),
            handlers=[handler],
            options=options,
            maximum_concurrent_rpcs=workers * 4,
        )
        handler.server = self.server
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address} (gRPC)")

    def start(self) -> None:
        self.server.start()

    def shutdown(self, timeout: float) -> None:
        self.server.stop(timeout).wait(timeout + 1)

