"""Model backends: ONNX Runtime, LiteRT (ai-edge-litert) and OpenVINO behind one small interface.

A backend exposes tensor metadata in Open Inference Protocol terms (name, datatype, shape with -1
for dynamic dimensions) and ``run(feeds, output_names) -> {name: ndarray}``. Heavy or optional
libraries are imported lazily so that an image without them still starts.

Artifact formats (what the compiler publishes; the digest always covers the stored bytes):

- ``.onnx``; ``.tflite`` (``TFL3`` at offset 4); OpenVINO IR ``.xml`` with a sibling ``.bin``
- gzip'd model (starts ``1f 8b``, application/vnd.edgefleet.model.onnx+gzip): decompressed in
  memory after the stored bytes passed the digest check, then sniffed again
- OpenVINO IR as a zip of ``model.xml`` + ``model.bin`` (application/vnd.edgefleet.model.openvino-ir+zip):
  read from memory (``core.read_model(model=xml_bytes, weights=Tensor)``), nothing written to disk
  (the serving container's root filesystem is read-only)
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Open Inference Protocol datatype <-> numpy dtype
OIP_TO_NP: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
NP_TO_OIP: dict[np.dtype, str] = {v: k for k, v in OIP_TO_NP.items()}

_ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

BACKENDS = ("auto", "onnxruntime", "litert", "openvino")
EXECUTION_PROVIDERS = ("auto", "cpu", "cuda", "tensorrt", "openvino")


# Decompressed size limit for gzip'd / zipped artifacts (a guard against decompression bombs).
MAX_MODEL_BYTES = int(os.environ.get("EDGEFLEET_MAX_MODEL_BYTES", 8 << 30))
# "true": a LiteRT delegate that cannot be loaded (no device or library on this node) falls back to the CPU
# instead of failing; the Coral image sets it, so one image serves nodes with and without an Edge TPU.
DELEGATE_OPTIONAL_ENV = "EDGEFLEET_DELEGATE_OPTIONAL"
log = logging.getLogger("edgefleet_runtime")


class ModelLoadError(RuntimeError):
    """The file could not be loaded by the chosen backend."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # OIP datatype the client must send / will receive
    shape: tuple[int, ...]  # -1 = any size

    @property
    def dtype(self) -> np.dtype:
        return OIP_TO_NP[self.datatype]

    def metadata(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


class Backend:
    name = "base"
    platform = "unknown"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {}

    def close(self) -> None:  # pragma: no cover - default no-op
        pass


def sniff(head: bytes) -> str:
    """Format of a model from its first bytes: ``gzip``, ``openvino-zip``, ``tflite``, ``openvino-ir`` or ``onnx``."""
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[:4] == b"PK\x03\x04":
        return "openvino-zip"
    if head[4:8] == b"TFL3":
        return "tflite"
    stripped = head.lstrip()
    if stripped.startswith(b"<?xml") or stripped.startswith(b"<net"):
        return "openvino-ir"
    return "onnx"


def detect_format(path: str | os.PathLike) -> str:
    """Sniff the file (see ``sniff``)."""
    with open(path, "rb") as f:
        return sniff(f.read(64))


@dataclass
class ModelSource:
    """What a backend loads: a file path, or bytes already in memory (unpacked from a gzip/zip artifact).

    ``fmt`` is the inner model format (``onnx``, ``tflite``, ``openvino-ir``); ``packaging`` is how it
    was stored (``file``, ``gzip``, ``openvino-zip``). For OpenVINO IR from memory ``data`` is model.xml
    and ``weights`` model.bin."""

    path: str
    fmt: str
    packaging: str = "file"
    data: bytes | None = None
    weights: bytes | None = None

    def describe(self) -> dict:
        return {"format": self.fmt, "packaging": self.packaging}


def _gunzip(data: bytes, limit: int) -> bytes:
    out = []
    total = 0
    while data:
        d = zlib.decompressobj(wbits=31)  # one gzip member
        while True:
            chunk = d.decompress(data, limit + 1 - total)
            total += len(chunk)
            out.append(chunk)
            if total > limit:
                raise ModelLoadError(f"gzip'd model unpacks to more than {limit} bytes (EDGEFLEET_MAX_MODEL_BYTES)")
            if d.eof or not d.unconsumed_tail:
                break
            data = d.unconsumed_tail
        if not d.eof:
            raise ModelLoadError("gzip'd model is truncated")
        data = d.unused_data.lstrip(b"\x00")  # further members (gzip -c a b), trailing padding
    return b"".join(out)


def _unzip_ir(data: bytes, limit: int) -> tuple[bytes, bytes]:
    """model.xml + model.bin from the compiler's OpenVINO IR zip (any single *.xml and its .bin)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = {i.filename: i for i in z.infolist() if not i.is_dir()}
            xml = "model.xml" if "model.xml" in infos else None
            if xml is None:
                xmls = [n for n in infos if n.endswith(".xml")]
                if len(xmls) != 1:
                    raise ModelLoadError(f"OpenVINO IR zip must hold model.xml + model.bin; it holds {sorted(infos)}")
                xml = xmls[0]
            bin_name = xml[: -len(".xml")] + ".bin"
            if sum(infos[n].file_size for n in (xml, bin_name) if n in infos) > limit:
                raise ModelLoadError(f"OpenVINO IR zip unpacks to more than {limit} bytes (EDGEFLEET_MAX_MODEL_BYTES)")
            return z.read(xml), (z.read(bin_name) if bin_name in infos else b"")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, KeyError, OSError, EOFError, zlib.error) as e:
        raise ModelLoadError(f"not a readable OpenVINO IR zip: {e}") from e


def read_model(path: str, limit: int | None = None) -> bytes:
    """The artifact's bytes, read once (everything after works on these bytes: nothing reopens the path)."""
    limit = MAX_MODEL_BYTES if limit is None else limit
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ModelLoadError(f"{path} is larger than {limit} bytes (EDGEFLEET_MAX_MODEL_BYTES)")
    return data


def open_source(path: str, digest: str | None = None, limit: int | None = None) -> ModelSource:
    """Read ``path`` once, check those bytes against ``digest`` (when given; ``digest.DigestError`` otherwise),
    then sniff and unpack them in memory (``source_from_bytes``)."""
    path = os.fspath(path)
    stored = read_model(path, limit)
    if digest is not None:
        from .digest import DigestError, parse_digest

        got = hashlib.sha256(stored).hexdigest()
        if got != parse_digest(digest):
            raise DigestError(f"digest mismatch for {path}: expected {digest}, file has sha256:{got}")
    if digest is None and sniff(stored[:64]) == "openvino-ir":  # bench on a local folder: the .bin beside it
        return ModelSource(path, "openvino-ir", "file", stored, _sibling_weights(path))
    return source_from_bytes(path, stored, limit, "file")


def _sibling_weights(path: str) -> bytes:
    for cand in (path + ".bin", str(Path(path).with_suffix(".bin"))):
        if os.path.isfile(cand):
            return read_model(cand)
    return b""


def source_from_bytes(path: str, data: bytes, limit: int | None = None, packaging: str = "encrypted") -> ModelSource:
    """A model whose artifact bytes are already in memory and checked by the caller (read once and hashed, or
    decrypted by ``trust``). ONNX that keeps tensors in other files is refused: only these bytes are verified."""
    fmt = sniff(data[:64])
    if fmt == "openvino-ir":
        raise ModelLoadError(f"{path}: OpenVINO IR XML: its .bin weights are not covered by the digest; "
                             "publish IR as a zip of model.xml + model.bin (what the compiler produces)")
    if fmt in ("gzip", "openvino-zip"):
        src = _unpack(path, data, fmt, limit)
        src.packaging = src.packaging if packaging == "file" else f"{packaging}+{src.packaging}"
    else:
        src = ModelSource(path, fmt, packaging, data)
    if src.fmt == "onnx":
        _refuse_external_data(path, src.data)
    return src


def _refuse_external_data(path: str, data: bytes | None) -> None:
    from .onnxfile import external_data

    try:
        found = external_data(data or b"")
    except Exception:  # noqa: BLE001 - not a parsable ONNX model: the backend says what is wrong with it
        return
    if found:
        name, location = found[0]
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise ModelLoadError(
            f"{path}: initializer '{name}' keeps its data in another file, {location!r}{more}: ONNX external data "
            "is not covered by the variant's digest (nor are the node's files it could name); save the model "
            "with its tensors inside it (onnx.save_model(..., save_as_external_data=False))"
        )


def _unpack(path: str, stored: bytes, packaging: str, limit: int | None) -> ModelSource:
    limit = MAX_MODEL_BYTES if limit is None else limit
    if packaging == "openvino-zip":
        xml, weights = _unzip_ir(stored, limit)
        return ModelSource(path, "openvino-ir", packaging, xml, weights)
    try:
        data = _gunzip(stored, limit)
    except (zlib.error, EOFError) as e:
        raise ModelLoadError(f"cannot decompress gzip'd model {path}: {e}") from e
    fmt = sniff(data[:64])
    if fmt in ("gzip", "openvino-zip"):
        raise ModelLoadError(f"{path}: gzip'd {fmt} is not a model format (nested packaging)")
    if fmt == "openvino-ir":
        raise ModelLoadError(f"{path}: gzip'd OpenVINO IR XML lacks its weights; publish IR as a zip")
    return ModelSource(path, fmt, packaging, data)


def _dims(shape) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in shape)


# --------------------------------------------------------------------------- ONNX Runtime
_EP_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    platform = "onnxruntime_onnx"

    def __init__(self, path: str | ModelSource, threads: int = 0, execution_provider: str = "auto",
                 precision: str = "auto", cache_dir: str | None = None, variant_digest: str | None = None):
        """``precision`` (TensorRT flags; auto = the model's own), ``cache_dir`` (the node cache: TensorRT engine
        and timing caches go under cache_dir/tensorrt) and ``variant_digest`` (part of the engine key) matter
        only when the TensorRT execution provider is used (see trtcache)."""
        import onnxruntime as ort

        src = path if isinstance(path, ModelSource) else ModelSource(os.fspath(path), "onnx")
        path = src.path
        self.source = src

        available = ort.get_available_providers()
        if execution_provider == "auto":
            providers = [_EP_NAMES[k] for k in ("tensorrt", "cuda", "openvino") if _EP_NAMES[k] in available]
        else:
            want = _EP_NAMES[execution_provider]
            if want not in available:
                raise ModelLoadError(
                    f"execution provider {execution_provider!r} ({want}) is not available in this "
                    f"onnxruntime build; available: {', '.join(available)}"
                )
            providers = [want] if want != "CPUExecutionProvider" else []
        providers.append("CPUExecutionProvider")
        self.tensorrt: dict = {}
        if _EP_NAMES["tensorrt"] in providers:
            opts = self._tensorrt_options(src, precision, cache_dir, variant_digest)
            configured: list = [(p, opts) if p == _EP_NAMES["tensorrt"] else p for p in providers]
            providers = configured
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        try:
            model = src.data if src.data is not None else path
            self.session = ort.InferenceSession(model, sess_options=so, providers=providers)
        except Exception as e:  # onnxruntime raises several private exception types
            raise ModelLoadError(f"onnxruntime cannot load {path}: {e}") from e
        self.providers = self.session.get_providers()
        self.inputs = [
            TensorSpec(i.name, _ORT_TYPES.get(i.type, "BYTES"), _dims(i.shape)) for i in self.session.get_inputs()
        ]
        self.outputs = [
            TensorSpec(o.name, _ORT_TYPES.get(o.type, "BYTES"), _dims(o.shape)) for o in self.session.get_outputs()
        ]
        self._run = self.session.run

    def run(self, feeds, output_names):
        values = self._run(output_names, feeds)
        return dict(zip(output_names, values, strict=True))

    def _tensorrt_options(self, src: ModelSource, precision: str, cache_dir: str | None,
                          variant_digest: str | None) -> dict[str, str]:
        from . import trtcache

        if precision == "auto":
            data = src.data if src.data is not None else Path(src.path).read_bytes()
            precision = trtcache.model_precision(data)
        stack = trtcache.detect()
        opts, off = trtcache.prepare(trtcache.provider_options(precision, cache_dir, variant_digest, stack))
        self.tensorrt = {"precision": precision, "stack": stack.__dict__,
                         "engineCache": off or opts.get("trt_engine_cache_path", "off: needs --cache, the variant "
                                                        "digest and a complete GPU stack")}
        return opts

    def describe(self):
        extra = {"tensorrt": self.tensorrt} if self.tensorrt else {}
        return {"execution_providers": self.providers, **self.source.describe(), **extra}


# --------------------------------------------------------------------------- LiteRT
class LiteRTBackend(Backend):
    """LiteRT interpreter. Quantized (int8/uint8) tensors are exposed to clients as FP32: inputs are
    quantized with the model's scale and zero point, outputs dequantized."""

    name = "litert"
    platform = "tensorflow_lite"

    def __init__(self, path: str | ModelSource, threads: int = 0, delegate: str | None = None):
        src = path if isinstance(path, ModelSource) else ModelSource(os.fspath(path), "tflite")
        path = src.path
        self.source = src
        try:
            from ai_edge_litert.interpreter import Interpreter, load_delegate
        except ImportError as e:  # pragma: no cover - depends on the image
            raise ModelLoadError(f"LiteRT is not installed in this image (ai-edge-litert): {e}") from e
        delegates, self.delegate_fallback = [], None
        if delegate:
            try:
                delegates.append(load_delegate(delegate))
            except (ValueError, OSError) as e:
                if os.environ.get(DELEGATE_OPTIONAL_ENV, "").lower() != "true":
                    raise ModelLoadError(f"cannot load LiteRT delegate {delegate!r}: {e}") from e
                self.delegate_fallback = f"delegate {delegate!r} not usable here ({e}); running on the CPU"
                log.warning("%s", self.delegate_fallback)
                delegate = None
        try:
            model = {"model_content": src.data} if src.data is not None else {"model_path": path}
            self.interpreter = Interpreter(
                **model, num_threads=threads or None, experimental_delegates=delegates or None
            )
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise ModelLoadError(f"LiteRT cannot load {path}: {e}") from e
        self.delegate = delegate
        self._lock = threading.Lock()
        self._in = self.interpreter.get_input_details()
        self._out = self.interpreter.get_output_details()
        self.inputs = [self._spec(d) for d in self._in]
        self.outputs = [self._spec(d) for d in self._out]
        self._in_by_name = {d["name"]: d for d in self._in}

    @staticmethod
    def _quant(d) -> tuple[float, int] | None:
        scale, zero = d.get("quantization", (0.0, 0))
        if np.dtype(d["dtype"]) in (np.int8, np.uint8, np.int16) and scale:
            return float(scale), int(zero)
        return None

    def _spec(self, d) -> TensorSpec:
        shape = d.get("shape_signature")
        if shape is None or len(shape) == 0:
            shape = d["shape"]
        dtype = np.dtype(np.float32) if self._quant(d) else np.dtype(d["dtype"])
        return TensorSpec(d["name"], NP_TO_OIP.get(dtype, "BYTES"), _dims([int(x) for x in shape]))

    def run(self, feeds, output_names):
        it = self.interpreter
        with self._lock:
            resized = False
            for name, arr in feeds.items():
                d = self._in_by_name[name]
                if tuple(it.get_input_details()[self._in.index(d)]["shape"]) != arr.shape:
                    it.resize_tensor_input(d["index"], list(arr.shape))
                    resized = True
            if resized:
                it.allocate_tensors()
            for name, arr in feeds.items():
                d = self._in_by_name[name]
                q = self._quant(d)
                if q:
                    scale, zero = q
                    info = np.iinfo(d["dtype"])
                    arr = np.clip(np.round(arr / scale) + zero, info.min, info.max).astype(d["dtype"])
                it.set_tensor(d["index"], arr)
            it.invoke()
            out = {}
            for d in self._out:
                if d["name"] not in output_names:
                    continue
                val = it.get_tensor(d["index"])
                q = self._quant(d)
                if q:
                    scale, zero = q
                    val = ((val.astype(np.float32) - zero) * scale).astype(np.float32)
                out[d["name"]] = val
        return out

    def describe(self):
        return {"delegate": self.delegate, "delegateFallback": self.delegate_fallback, **self.source.describe()}


# --------------------------------------------------------------------------- OpenVINO
_OV_TYPES = {
    "boolean": "BOOL",
    "u8": "UINT8",
    "u16": "UINT16",
    "u32": "UINT32",
    "u64": "UINT64",
    "i8": "INT8",
    "i16": "INT16",
    "i32": "INT32",
    "i64": "INT64",
    "f16": "FP16",
    "f32": "FP32",
    "f64": "FP64",
}


class OpenVINOBackend(Backend):
    name = "openvino"
    platform = "openvino"

    def __init__(self, path: str | ModelSource, threads: int = 0, device: str = "CPU"):
        src = path if isinstance(path, ModelSource) else ModelSource(os.fspath(path), detect_format(path))
        path = src.path
        self.source = src
        try:
            import openvino as ov
        except ImportError as e:
            raise ModelLoadError(f"OpenVINO is not installed in this image: {e}") from e
        core = ov.Core()
        config: dict = {"INFERENCE_NUM_THREADS": threads} if threads else {}
        if device == "CPU":
            # The compiler measured (and gated accuracy on) f32 inference; OpenVINO's CPU default is
            # bf16 where the CPU has it, which would serve other numbers than the report states.
            config["INFERENCE_PRECISION_HINT"] = os.environ.get("EDGEFLEET_OPENVINO_PRECISION", "f32")
        try:
            if src.data is not None:
                # model.xml + model.bin from memory (IR zip), or an in-memory ONNX/TFLite model
                weights = np.frombuffer(src.weights or b"", dtype=np.uint8)
                model = core.read_model(model=src.data, weights=ov.Tensor(weights))
            else:
                model = core.read_model(path)
            self.compiled = core.compile_model(model, device, config)
        except Exception as e:
            raise ModelLoadError(f"OpenVINO cannot load {path}: {e}") from e
        self.device = device

        def spec(port) -> TensorSpec:
            ps = port.get_partial_shape()
            shape = tuple(d.get_length() if d.is_static else -1 for d in ps)
            oip = _OV_TYPES.get(port.get_element_type().get_type_name(), "BYTES")
            return TensorSpec(port.get_any_name(), oip, shape)

        self.inputs = [spec(p) for p in self.compiled.inputs]
        self.outputs = [spec(p) for p in self.compiled.outputs]
        self._out_ports = {p.get_any_name(): p for p in self.compiled.outputs}
        self._local = threading.local()

    def run(self, feeds, output_names):
        req = getattr(self._local, "req", None)
        if req is None:
            req = self._local.req = self.compiled.create_infer_request()
        res = req.infer(feeds)
        return {n: np.asarray(res[self._out_ports[n]]) for n in output_names}

    def describe(self):
        return {"device": self.device, **self.source.describe()}


def open_backend(
    path: str,
    backend: str = "auto",
    threads: int = 0,
    execution_provider: str = "auto",
    delegate: str | None = None,
    digest: str | None = None,
    data: bytes | None = None,
    packaging: str = "encrypted",
    precision: str = "auto",
    cache_dir: str | None = None,
) -> Backend:
    """Load ``path`` (any artifact format, see the module docstring), read once. ``digest``: checked against the
    bytes read, which are then unpacked and loaded (raises ``digest.DigestError``). ``data``: the
    model's bytes in memory instead of the file's, already verified (``packaging``: ``file`` when they are the file's
    own bytes, read once and hashed; ``encrypted`` when decrypted); ``digest`` then names them (the TensorRT engine
    key). ``precision`` and ``cache_dir``: TensorRT flags and the node cache for its engines (see trtcache)."""
    src = open_source(path, digest) if data is None else source_from_bytes(path, data, packaging=packaging)
    if backend == "auto":
        backend = {"tflite": "litert", "openvino-ir": "openvino"}.get(src.fmt, "onnxruntime")
    if backend == "onnxruntime":
        if src.fmt == "openvino-ir":
            raise ModelLoadError(f"{path} is OpenVINO IR ({src.packaging}); serve it with --backend openvino or auto")
        return OnnxRuntimeBackend(src, threads, execution_provider, precision, cache_dir, digest)
    if backend == "litert":
        if src.fmt != "tflite":
            raise ModelLoadError(f"{path} is {src.fmt} ({src.packaging}), not a .tflite; LiteRT cannot load it")
        return LiteRTBackend(src, threads, delegate)
    if backend == "openvino":
        return OpenVINOBackend(src, threads)
    raise ModelLoadError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
