"""Open Inference Protocol v2 (REST) request decoding and response encoding.

Supports JSON tensors (flat or nested ``data``) and the binary tensor data extension: the body is
a JSON header of ``Inference-Header-Content-Length`` bytes followed by raw little-endian tensor
bytes, in input order, for each input that declares ``parameters.binary_data_size``.
Every rejection is a :class:`RequestError` whose message names the offending field.
"""

from __future__ import annotations

import math
import re
import struct
import warnings

import numpy as np
import orjson

from .backends import NP_TO_OIP, OIP_TO_NP, TensorSpec
from .budget import BudgetExceeded, Lease

MAX_ELEMENTS = 1 << 25
"""Elements in one input at most, zero-sized dimensions counted as 1 (the default --max-body-bytes cannot carry
more, and an empty input must not make a backend allocate an output that large): every dimension is bounded too."""
_ASCII_DIGITS = re.compile(r"[0-9]{1,18}")  # a str pattern: [0-9] is ASCII only (str.isdigit takes '\xb2')
# values beyond a float type's range become inf on the cast (and inf + -inf NaN in the check that refuses them)
warnings.filterwarnings("ignore", "overflow encountered in cast", RuntimeWarning, __name__)
warnings.filterwarnings("ignore", "invalid value encountered in reduce", RuntimeWarning, __name__)


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class MemoryRefused(RequestError):
    """The process's memory budget cannot hold a request: 413 if it never could, else 503 (retry); gRPC answers
    both RESOURCE_EXHAUSTED."""


BYTES_ELEMENT_COST = 96  # a decoded BYTES element beside its bytes: object pointer, bytes header, backend string


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


def _bad(msg: str) -> RequestError:
    return RequestError(400, msg)


def header_int(name: str, value: str) -> int:
    """A numeric header: 1 to 18 ASCII digits, else 400 naming the header."""
    if not _ASCII_DIGITS.fullmatch(value):
        raise _bad(f"header {name} {value[:40]!r} is not a number of ASCII digits")
    return int(value)


def _fmt_shape(shape) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _decode_bytes_tensor(buf: memoryview, count: int, name: str, lease: Lease | None = None) -> np.ndarray:
    """Binary BYTES (u32 length + bytes, per element), charged at its decoded size before it is decoded."""
    charge(lease, count * BYTES_ELEMENT_COST + len(buf), f"input '{name}' ({count} BYTES elements decoded)")
    out, pos = [], 0
    for _ in range(count):
        if pos + 4 > len(buf):
            raise _bad(f"input '{name}': BYTES binary data is truncated")
        (n,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if pos + n > len(buf):
            raise _bad(f"input '{name}': BYTES element of {n} bytes runs past the binary data")
        out.append(bytes(buf[pos : pos + n]))
        pos += n
    if pos != len(buf):
        raise _bad(f"input '{name}': binary_data_size does not match its BYTES elements")
    return np.array(out, dtype=object)


def check_finite(name: str, arr: np.ndarray, datatype: str) -> np.ndarray:
    """Float inputs hold no NaN or infinity, whatever the transport (JSON cannot carry them; binary data and gRPC
    can): 400 naming the input. One float64 sum decides for FP16/FP32 (finite values cannot overflow it); FP64's
    sum can, so an infinite sum is looked at element by element."""
    if arr.dtype.kind != "f" or not arr.size or math.isfinite(np.add.reduce(arr, axis=None, dtype=np.float64)):
        return arr
    if arr.dtype.itemsize < 8 or not np.isfinite(arr).all():
        raise _bad(f"input '{name}': data holds NaN or infinity; {datatype} inputs must be finite numbers")
    return arr


def _flat(data):
    for v in data:
        if isinstance(v, list):
            yield from _flat(v)
        else:
            yield v


def _first_bad(data: list, ok) -> str:
    """``data[i] is ...`` for the first flat element that ``ok`` refuses (only on the error path)."""
    for i, v in enumerate(_flat(data)):
        if not ok(v):
            what = "null" if v is None else f"{type(v).__name__} {str(v)[:20]!r}"
            return f"data[{i}] is {what}"
    return "data has values of mixed types"


def _json_values(name: str, data: list, datatype: str, dtype: np.dtype, has_bools: bool = True) -> np.ndarray:
    """The JSON ``data`` of one input as ``dtype``; 400 naming the input for null, strings, booleans where
    numbers belong, fractions or out-of-range values for integers, and values a float type cannot hold."""
    if datatype == "BYTES":
        try:
            return np.asarray(data, dtype=object)
        except ValueError as e:
            raise _bad(f"input '{name}': data is not a valid BYTES list: {e}") from None
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError) as e:
        raise _bad(f"input '{name}': data is not a valid {datatype} list: {e}") from None
    kind = arr.dtype.kind
    if kind == "O" and dtype.kind == "f" and all(type(v) in (int, float) for v in _flat(data)):
        arr, kind = np.asarray(data, dtype=np.float64), "f"  # integers beyond int64 mixed with floats
    if datatype == "BOOL":
        if kind != "b":
            bad = _first_bad(data, lambda v: type(v) is bool)
            raise _bad(f"input '{name}': data is not a valid BOOL list: {bad}; BOOL needs true/false")
        return arr
    if kind in "iuf" and has_bools and any(type(v) is bool for v in _flat(data)):
        kind = "b"  # true/false among numbers: numpy made them 1/0
    if kind not in "iuf":
        number = lambda v: type(v) is float or (type(v) is int and -(2**63) <= v < 2**64)  # noqa: E731
        bad = _first_bad(data, number)
        raise _bad(f"input '{name}': data is not a valid {datatype} list: {bad}; {datatype} needs numbers in range")
    if dtype.kind in "iu":
        if kind == "f" and not np.array_equal(arr, np.floor(arr)):
            whole = lambda v: float(v).is_integer()  # noqa: E731
            bad = _first_bad(data, whole)
            raise _bad(f"input '{name}': data is not a valid {datatype} list: {bad}; {datatype} needs integers")
        info = np.iinfo(dtype)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise _bad(f"input '{name}': data has values outside {datatype}'s range [{info.min}, {info.max}]")
        return arr.astype(dtype)
    if kind == "f" and dtype == arr.dtype:
        return arr  # FP64 from JSON: always finite (the parser refuses NaN and Infinity)
    out = arr.astype(dtype)  # beyond FP32/FP16's range -> inf (numpy's RuntimeWarning is filtered below)
    # one reduction: a float64 sum of finite halves/floats is finite, of anything with inf or NaN not
    if not math.isfinite(np.add.reduce(out, axis=None, dtype=np.float64)):
        raise _bad(f"input '{name}': data has values beyond {datatype}'s range (a finite number is needed)")
    return out


def check_tensor(name: str, datatype, shape, model_name: str, inputs: dict[str, TensorSpec], feeds: dict,
                 encoded: dict[str, TensorSpec] | None = None):
    """One input's name, datatype and shape against the model (REST and gRPC): ``(spec, element count)``.
    ``encoded``: inputs that also take encoded images as BYTES (the model's declared pre-processing)."""
    spec = inputs.get(name)
    if spec is None:
        raise _bad(f"unexpected input '{name}' for model '{model_name}'; expected inputs: {', '.join(inputs)}")
    if name in feeds:
        raise _bad(f"input '{name}' is given more than once")
    if encoded and datatype == "BYTES" and name in encoded:
        spec = encoded[name]
    if datatype != spec.datatype:
        if not isinstance(datatype, str) or datatype not in OIP_TO_NP:
            raise _bad(f"input '{name}': datatype {datatype!r} is not an Open Inference Protocol datatype")
        raise _bad(f"input '{name}': datatype {datatype} does not match the model's {spec.datatype}")
    count = size = 1  # size: the elements with zero-sized dimensions counted as 1 (what an output can take)
    if type(shape) is list and len(shape) == len(spec.shape):
        for d, m in zip(shape, spec.shape, strict=True):  # a plain loop: this runs for every request
            if type(d) is not int or d < 0 or (d != m and m != -1):
                _shape_error(name, shape, spec)
            if d > MAX_ELEMENTS:
                raise _bad(f"input '{name}': shape {_fmt_shape(shape)} has a dimension over {MAX_ELEMENTS}")
            count *= d
            size *= d or 1
    else:
        _shape_error(name, shape, spec)
    if size > MAX_ELEMENTS:
        what = f"{count} elements" if count == size else f"{size} elements (zero-sized dimensions counted as 1)"
        raise RequestError(413, f"input '{name}': shape {_fmt_shape(shape)} means {what}; this server accepts "
                                f"at most {MAX_ELEMENTS} per input")
    return spec, count


def check_output_count(count: int, model_name: str, outputs: dict[str, TensorSpec]) -> None:
    """No more outputs requested than the model has (checked before the request's list is read)."""
    if count > len(outputs):
        raise _bad(f"{count} outputs requested; model '{model_name}' has {len(outputs)}: "
                   f"{', '.join(outputs)} (name each at most once)")


def check_outputs(names: list[str], model_name: str, outputs: dict[str, TensorSpec]) -> list[str]:
    """The requested output names (REST and gRPC): known to the model, each at most once; ``names`` unchanged."""
    check_output_count(len(names), model_name, outputs)
    seen: set[str] = set()
    for n in names:
        if n not in outputs:
            raise _bad(f"unknown output '{n}' for model '{model_name}'; outputs: {', '.join(outputs)}")
        if n in seen:
            raise _bad(f"output '{n}' is requested more than once")
        seen.add(n)
    return names


def _shape_error(name: str, shape, spec: TensorSpec):
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise _bad(f"input '{name}': shape must be a list of non-negative integers, got {shape!r}")
    raise _bad(
        f"input '{name}': shape {_fmt_shape(shape)} does not match the model's {_fmt_shape(spec.shape)} (-1 = any size)"
    )


def decode_infer_request(
    body: bytes,
    header_length: int | None,
    model_name: str,
    inputs: dict[str, TensorSpec],
    outputs: dict[str, TensorSpec],
    lease: Lease | None = None,
    encoded: dict[str, TensorSpec] | None = None,
):
    """Return ``(request_id, feeds, [(output_name, binary)])`` or raise RequestError. ``lease``: what decoding
    grows by (binary BYTES) is charged to it; ``encoded``: inputs that also take BYTES (encoded images)."""
    if header_length is None:
        json_part, binary = body, memoryview(b"")
    else:
        if header_length < 0 or header_length > len(body):
            raise _bad(f"header Inference-Header-Content-Length is {header_length} but the body has {len(body)} bytes")
        view = memoryview(body)
        json_part, binary = view[:header_length], view[header_length:]
    json_text = bytes(json_part)
    has_bools = None  # does the text hold true/false? Looked for once, when a JSON data list needs it
    try:
        req = orjson.loads(json_text)
    except orjson.JSONDecodeError as e:
        raise _bad(f"malformed JSON in request body: {e}") from None
    if not isinstance(req, dict):
        raise _bad("request body must be a JSON object with an 'inputs' list")
    req_id = req.get("id")
    if req_id is not None and not isinstance(req_id, str):
        raise _bad("field 'id' must be a string")
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad("field 'parameters' must be an object")
    raw_inputs = req.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise _bad("field 'inputs' must be a non-empty list of tensors")

    feeds: dict[str, np.ndarray] = {}
    offset = 0
    for i, t in enumerate(raw_inputs):
        if not isinstance(t, dict):
            raise _bad(f"inputs[{i}] must be an object with name, shape, datatype and data")
        name = t.get("name")
        if not isinstance(name, str):
            raise _bad(f"inputs[{i}].name must be a string")
        datatype, shape = t.get("datatype"), t.get("shape")
        spec, count = check_tensor(name, datatype, shape, model_name, inputs, feeds, encoded)
        dtype = spec.dtype
        tparams = t.get("parameters") or {}
        if not isinstance(tparams, dict):
            raise _bad(f"input '{name}': parameters must be an object")
        bsize = tparams.get("binary_data_size")
        if bsize is not None:
            if type(bsize) is not int or bsize < 0:
                raise _bad(f"input '{name}': parameters.binary_data_size must be a non-negative integer")
            if offset + bsize > len(binary):
                raise _bad(
                    f"input '{name}': binary_data_size {bsize} runs past the binary data "
                    f"({len(binary) - offset} bytes left)"
                )
            chunk = binary[offset : offset + bsize]
            offset += bsize
            if datatype == "BYTES":
                arr = _decode_bytes_tensor(chunk, count, name, lease)
            else:
                if bsize != count * dtype.itemsize:
                    raise _bad(
                        f"input '{name}': binary_data_size {bsize} does not match shape {_fmt_shape(shape)} "
                        f"of {datatype} ({count * dtype.itemsize} bytes)"
                    )
                arr = check_finite(name, np.frombuffer(chunk, dtype=dtype.newbyteorder("<")), spec.datatype)
        else:
            data = t.get("data")
            if data is None:
                raise _bad(f"input '{name}': needs 'data' or parameters.binary_data_size")
            if not isinstance(data, list):
                data = [data]
            if has_bools is None:  # "f" first: one memchr, and the usual keys have no "f"
                has_bools = b"true" in json_text or (b"f" in json_text and b"false" in json_text)
            arr = _json_values(name, data, datatype, dtype, has_bools)
            if arr.size != count:
                raise _bad(f"input '{name}': data has {arr.size} values but shape {_fmt_shape(shape)} needs {count}")
        feeds[name] = arr.reshape(shape)
    if offset != len(binary):
        raise _bad(f"binary tensor data has {len(binary) - offset} bytes that no input claims")
    missing = [n for n in inputs if n not in feeds]
    if missing:
        raise _bad(f"missing input(s) for model '{model_name}': {', '.join(missing)}")

    default_binary = params.get("binary_data_output", False) is True
    raw_outputs = req.get("outputs")
    wanted: list[tuple[str, bool]] = []
    if raw_outputs is None or raw_outputs == []:
        wanted = [(n, default_binary) for n in outputs]
    else:
        if not isinstance(raw_outputs, list):
            raise _bad("field 'outputs' must be a list")
        check_output_count(len(raw_outputs), model_name, outputs)
        for i, o in enumerate(raw_outputs):
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise _bad(f"outputs[{i}] must be an object with a string 'name'")
            oname = o["name"]
            oparams = o.get("parameters") or {}
            if not isinstance(oparams, dict):
                raise _bad(f"outputs[{i}].parameters must be an object")
            binary_flag = oparams.get("binary_data", default_binary)
            wanted.append((oname, binary_flag is True))
        check_outputs([n for n, _ in wanted], model_name, outputs)
    return req_id, feeds, wanted


def _bytes_tensor_to_binary(arr: np.ndarray) -> bytes:
    parts = []
    for item in arr.ravel():
        b = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def encode_infer_response(
    model_name: str, model_version: str, req_id, results: dict[str, np.ndarray], wanted
) -> tuple[bytes, int | None]:
    """Return ``(body, json_header_length or None)``."""
    outs = []
    blobs: list[bytes] = []
    for name, binary in wanted:
        arr = results[name]
        datatype = NP_TO_OIP.get(arr.dtype, "BYTES")
        entry = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if binary:
            if datatype == "BYTES":
                blob = _bytes_tensor_to_binary(arr)
            else:
                blob = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif datatype == "BYTES":
            entry["data"] = [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in arr.ravel()]
        elif datatype == "FP16":
            entry["data"] = arr.astype(np.float32).ravel()
        else:
            entry["data"] = np.ascontiguousarray(arr).ravel()
        outs.append(entry)
    resp = {"model_name": model_name, "model_version": model_version, "outputs": outs}
    if req_id is not None:
        resp["id"] = req_id
    head = orjson.dumps(resp, option=orjson.OPT_SERIALIZE_NUMPY)
    if blobs:
        return head + b"".join(blobs), len(head)
    return head, None
