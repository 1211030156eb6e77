"""TensorRT execution provider options: precision flags, and an engine and timing cache on the node cache.

A TensorRT engine is compiled for one TensorRT version, one CUDA version and one GPU (compute capability and
model); loaded anywhere else it fails or, worse, runs with tactics timed for another chip. So the engine cache
folder is named by a key over the variant's digest and all of those (and the JetPack release on a Jetson): a
node with another GPU or stack gets another folder and builds its own engine, never another node's. The timing
cache (per-layer tactic timings, model independent) is keyed the same way without the digest.

Precision flags follow the served variant, not the profile alone: an fp16 variant gets ``trt_fp16_enable``, a
QDQ int8 variant ``trt_int8_enable`` (explicit quantization: the scales are in the graph, no calibration table)
plus fp16 for the layers left float; an fp32 variant gets neither, since the compiler chose fp32 on that class
because fp16 did not hold (enabling it in TensorRT would bring that loss back).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

PRECISIONS = ("auto", "fp32", "fp16", "int8")
JETSON_RELEASE = "/etc/nv_tegra_release"  # "# R36 (release), REVISION: 3.0, ..." on JetPack 6


@dataclass(frozen=True)
class GpuStack:
    """What a TensorRT engine is bound to. Unknown parts are "" (and still part of the key)."""

    tensorrt: str
    cuda: str
    gpu: str  # the device name, e.g. "NVIDIA H100 80GB HBM3", "Orin (nvgpu)"
    compute_capability: str  # e.g. "9.0", "8.7"
    jetpack: str = ""  # L4T release on a Jetson, e.g. "R36.3.0"

    def complete(self) -> bool:
        return all((self.tensorrt, self.cuda, self.gpu, self.compute_capability))


def _key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:40] or "unknown"


def engine_key(variant_digest: str, stack: GpuStack) -> str:
    """Folder name for the variant's engines on this stack: readable parts, then a hash over all of them."""
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", variant_digest):
        raise ValueError(f"variant digest {variant_digest!r} is not sha256:<64 hex>")
    fields = {"digest": variant_digest, **asdict(stack)}
    return (f"{variant_digest[7:19]}-trt{_slug(stack.tensorrt)}-cuda{_slug(stack.cuda)}"
            f"-sm{_slug(stack.compute_capability)}-{_key(fields)[:16]}")


def timing_key(stack: GpuStack) -> str:
    return f"timing-trt{_slug(stack.tensorrt)}-sm{_slug(stack.compute_capability)}-{_key(asdict(stack))[:16]}"


def provider_options(precision: str, cache_root: str | os.PathLike | None, variant_digest: str | None,
                     stack: GpuStack | None) -> dict[str, str]:
    """Options for ``TensorrtExecutionProvider`` (ONNX Runtime spells every value as a string).

    The caches are on only when the node cache, the variant digest and a complete GpuStack are all known:
    an engine stored under a key that misses the GPU could be loaded on another GPU."""
    if precision not in PRECISIONS or precision == "auto":
        raise ValueError(f"precision {precision!r}: give fp32, fp16 or int8 (auto is resolved from the model first)")
    opts = {"trt_fp16_enable": str(precision in ("fp16", "int8")),
            "trt_int8_enable": str(precision == "int8")}
    if cache_root is not None and variant_digest and stack is not None and stack.complete():
        root = Path(cache_root) / "tensorrt"
        opts.update({
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(root / engine_key(variant_digest, stack)),
            "trt_timing_cache_enable": "True",
            "trt_timing_cache_path": str(root / timing_key(stack)),
        })
    return opts


CACHE_OPTIONS = ("trt_engine_cache_enable", "trt_engine_cache_path", "trt_timing_cache_enable",
                 "trt_timing_cache_path")


def prepare(opts: dict[str, str]) -> tuple[dict[str, str], str]:
    """Create the cache folders the options name (TensorRT does not). Serve pods mount the node cache read-only:
    an engine folder that is there (the bench Job built it) is used as is; one that cannot be created turns the
    caches off (the engine is built in memory), and the second value says why ("" when the caches are on)."""
    if "trt_engine_cache_path" not in opts:
        return opts, ""
    engine = Path(opts["trt_engine_cache_path"])
    if engine.is_dir():
        return opts, ""
    try:
        for k in ("trt_engine_cache_path", "trt_timing_cache_path"):
            Path(opts[k]).mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        off = {k: v for k, v in opts.items() if k not in CACHE_OPTIONS}
        return off, (f"off: no engine for this key in {engine.parent} and it cannot be written "
                     f"({e.strerror or type(e).__name__}); built in memory")
    return opts, ""


def model_precision(model_bytes: bytes) -> str:
    """fp16 / int8 / fp32 of a served ONNX model: QDQ nodes -> int8; float16 initializers -> fp16."""
    from .onnxfile import precision

    return precision(model_bytes)


# --------------------------------------------------------------------------- what this node has
def _lib(*names: str):
    for n in names:
        try:
            return ctypes.CDLL(n)
        except OSError:
            continue
    return None


def _cuda_device() -> tuple[str, str, str]:
    """(driver CUDA version, device 0 name, compute capability) from libcuda; "" where unknown."""
    cuda = _lib("libcuda.so.1", "libcuda.so")
    if cuda is None or cuda.cuInit(0) != 0:
        return "", "", ""
    ver, dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    name = ctypes.create_string_buffer(256)
    if cuda.cuDriverGetVersion(ctypes.byref(ver)) or cuda.cuDeviceGet(ctypes.byref(dev), 0):
        return "", "", ""
    cuda.cuDeviceGetName(name, 256, dev)
    # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76
    cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)
    v = _cudart_version() or ver.value  # the CUDA runtime ONNX Runtime links, else the driver's
    return f"{v // 1000}.{v % 1000 // 10}", name.value.decode(errors="replace"), f"{major.value}.{minor.value}"


def _cudart_version() -> int:
    lib = _lib("libcudart.so.12", "libcudart.so.13", "libcudart.so.11.0", "libcudart.so")
    ver = ctypes.c_int()
    return ver.value if lib is not None and lib.cudaRuntimeGetVersion(ctypes.byref(ver)) == 0 else 0


def _tensorrt_version() -> str:
    lib = _lib("libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so")
    if lib is None:
        return ""
    v = int(lib.getInferLibVersion())  # MAJOR*10000 + MINOR*100 + PATCH (TensorRT >= 10; *1000/*100 before)
    if v >= 100000:
        return f"{v // 10000}.{v % 10000 // 100}.{v % 100}"
    return f"{v // 1000}.{v % 1000 // 100}.{v % 100}"


def _jetpack(path: str = JETSON_RELEASE) -> str:
    try:
        head = Path(path).read_text(errors="replace")[:200]
    except OSError:
        return ""
    m = re.search(r"R(\d+).*?REVISION:\s*([\d.]+)", head)
    return f"R{m.group(1)}.{m.group(2)}" if m else ""


def detect() -> GpuStack:
    """This node's stack (a GPU-less node gets all ""): read once per model load, no subprocess."""
    cuda, gpu, cc = _cuda_device()
    return GpuStack(tensorrt=_tensorrt_version(), cuda=cuda, gpu=gpu, compute_capability=cc, jetpack=_jetpack())
