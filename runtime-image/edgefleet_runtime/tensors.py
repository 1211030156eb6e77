"""Tensor checks and binary tensor codecs shared by every transport (REST's ``protocol``, ``grpcserver``).

Every rejection is a :class:`RequestError` whose message names the offending field; the transports map its
``status`` onto their own codes (HTTP status, gRPC status code).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import numpy as np

from .backends import OIP_TO_NP, TensorSpec
from .budget import BudgetExceeded, Lease

MAX_ELEMENTS = 1 << 25
"""Elements in one input at most, zero-sized dimensions counted as 1 (the default --max-body-bytes cannot carry
more, and an empty input must not make a backend allocate an output that large): every dimension is bounded too."""
BYTES_ELEMENT_COST = 96  # a decoded BYTES element beside its bytes: object pointer, bytes header, backend string


class RequestError(Exception):
    """A request the server refuses: ``status`` is the HTTP status (gRPC maps it), ``message`` names the field."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class MemoryRefused(RequestError):
    """The process's memory budget cannot hold a request: 413 if it never could, else 503 (retry); gRPC answers
    both RESOURCE_EXHAUSTED."""


def bad(msg: str) -> RequestError:
    return RequestError(400, msg)


def charge(lease: Lease | None, n: int, what: str) -> None:
    """Hold ``n`` more bytes of the memory budget for ``what``; MemoryRefused naming the fix otherwise."""
    if lease is None:
        return
    try:
        lease.charge(n)
    except BudgetExceeded as e:
        if e.full:
            raise MemoryRefused(503, f"{what} needs {n} bytes of memory; the server has too many requests in "
                                     "flight; retry after 1 s") from None
        raise MemoryRefused(413, f"{what} needs {e.needed} bytes of memory, more than the server's memory "
                                 f"budget of {e.capacity} (--body-budget-bytes): send less at once") from None


def fmt_shape(shape: Sequence[object]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def decode_bytes_tensor(buf: memoryview, count: int, name: str, lease: Lease | None = None) -> np.ndarray:
    """Binary BYTES (u32 length + bytes, per element), charged at its decoded size before it is decoded."""
    charge(lease, count * BYTES_ELEMENT_COST + len(buf), f"input '{name}' ({count} BYTES elements decoded)")
    out, pos = [], 0
    for _ in range(count):
        if pos + 4 > len(buf):
            raise bad(f"input '{name}': BYTES binary data is truncated")
        (n,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if pos + n > len(buf):
            raise bad(f"input '{name}': BYTES element of {n} bytes runs past the binary data")
        out.append(bytes(buf[pos : pos + n]))
        pos += n
    if pos != len(buf):
        raise bad(f"input '{name}': binary_data_size does not match its BYTES elements")
    return np.array(out, dtype=object)


def bytes_tensor_to_binary(arr: np.ndarray) -> bytes:
    """A BYTES tensor as binary data: u32 length + bytes per element (non-bytes elements as their str)."""
    parts = []
    for item in arr.ravel():
        b = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def tensor_to_binary(arr: np.ndarray, datatype: str) -> bytes:
    """An output as binary data: little-endian raw values, or BYTES elements with their lengths."""
    if datatype == "BYTES":
        return bytes_tensor_to_binary(arr)
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


def check_finite(name: str, arr: np.ndarray, datatype: str) -> np.ndarray:
    """Float inputs hold no NaN or infinity, whatever the transport (JSON cannot carry them; binary data and gRPC
    can): 400 naming the input. One float64 sum decides for FP16/FP32 (finite values cannot overflow it); FP64's
    sum can, so an infinite sum is looked at element by element."""
    if arr.dtype.kind != "f" or not arr.size:
        return arr
    with np.errstate(invalid="ignore"):  # inf + -inf is NaN: refused below
        if math.isfinite(np.add.reduce(arr, axis=None, dtype=np.float64)):
            return arr
    if arr.dtype.itemsize < 8 or not np.isfinite(arr).all():
        raise bad(f"input '{name}': data holds NaN or infinity; {datatype} inputs must be finite numbers")
    return arr


def check_tensor(
    name: str, datatype: object, shape: object, model_name: str, inputs: Mapping[str, TensorSpec],
    feeds: Mapping[str, Any], encoded: Mapping[str, TensorSpec] | None = None,
) -> tuple[TensorSpec, int]:
    """One input's name, datatype and shape against the model (REST and gRPC): ``(spec, element count)``.
    ``encoded``: inputs that also take encoded images as BYTES (the model's declared pre-processing)."""
    spec = inputs.get(name)
    if spec is None:
        raise bad(f"unexpected input '{name}' for model '{model_name}'; expected inputs: {', '.join(inputs)}")
    if name in feeds:
        raise bad(f"input '{name}' is given more than once")
    if encoded and datatype == "BYTES" and name in encoded:
        spec = encoded[name]
    if datatype != spec.datatype:
        if not isinstance(datatype, str) or datatype not in OIP_TO_NP:
            raise bad(f"input '{name}': datatype {datatype!r} is not an Open Inference Protocol datatype")
        raise bad(f"input '{name}': datatype {datatype} does not match the model's {spec.datatype}")
    count = size = 1  # size: the elements with zero-sized dimensions counted as 1 (what an output can take)
    if type(shape) is list and len(shape) == len(spec.shape):
        for d, m in zip(shape, spec.shape, strict=True):  # a plain loop: this runs for every request
            if type(d) is not int or d < 0 or (d != m and m != -1):
                _shape_error(name, shape, spec)
            if d > MAX_ELEMENTS:
                raise bad(f"input '{name}': shape {fmt_shape(shape)} has a dimension over {MAX_ELEMENTS}")
            count *= d
            size *= d or 1
    else:
        _shape_error(name, shape, spec)
    if size > MAX_ELEMENTS:
        what = f"{count} elements" if count == size else f"{size} elements (zero-sized dimensions counted as 1)"
        raise RequestError(413, f"input '{name}': shape {fmt_shape(shape)} means {what}; this server accepts "
                                f"at most {MAX_ELEMENTS} per input")
    return spec, count


def check_output_count(count: int, model_name: str, outputs: Mapping[str, TensorSpec]) -> None:
    """No more outputs requested than the model has (checked before the request's list is read)."""
    if count > len(outputs):
        raise bad(f"{count} outputs requested; model '{model_name}' has {len(outputs)}: "
                  f"{', '.join(outputs)} (name each at most once)")


def check_outputs(names: list[str], model_name: str, outputs: Mapping[str, TensorSpec]) -> list[str]:
    """The requested output names (REST and gRPC): known to the model, each at most once; ``names`` unchanged."""
    check_output_count(len(names), model_name, outputs)
    seen: set[str] = set()
    for n in names:
        if n not in outputs:
            raise bad(f"unknown output '{n}' for model '{model_name}'; outputs: {', '.join(outputs)}")
        if n in seen:
            raise bad(f"output '{n}' is requested more than once")
        seen.add(n)
    return names


def check_missing(model_name: str, inputs: Mapping[str, TensorSpec], feeds: Mapping[str, Any]) -> None:
    """Every input of the model is given (REST and gRPC)."""
    missing = [n for n in inputs if n not in feeds]
    if missing:
        raise bad(f"missing input(s) for model '{model_name}': {', '.join(missing)}")


def _shape_error(name: str, shape: object, spec: TensorSpec) -> NoReturn:
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"input '{name}': shape must be a list of non-negative integers, got {shape!r}")
    raise bad(
        f"input '{name}': shape {fmt_shape(shape)} does not match the model's {fmt_shape(spec.shape)} (-1 = any size)"
    )
