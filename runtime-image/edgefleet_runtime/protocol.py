"""Open Inference Protocol v2 (REST) codec: infer bodies to the data plane's InferRequest, InferResponse to bodies.

Supports JSON tensors (flat or nested ``data``) and the binary tensor data extension: the body is
a JSON header of ``Inference-Header-Content-Length`` bytes followed by raw little-endian tensor
bytes, in input order, for each input that declares ``parameters.binary_data_size``.
Every rejection is a :class:`RequestError` whose message names the offending field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

import numpy as np
import orjson

from .backends import NP_TO_OIP, TensorSpec
from .budget import Lease
from .dataplane import InferRequest, InferResponse, LoadedModel, RequestedOutput
from .tensors import (  # noqa: F401 - RequestError and MemoryRefused are re-exported: callers catch them here
    MemoryRefused,
    RequestError,
    bad,
    check_finite,
    check_missing,
    check_output_count,
    check_outputs,
    check_tensor,
    decode_bytes_tensor,
    fmt_shape,
    tensor_to_binary,
)

_ASCII_DIGITS = re.compile(r"[0-9]{1,18}")  # a str pattern: [0-9] is ASCII only (str.isdigit takes '\xb2')
_bad = bad


def header_int(name: str, value: str) -> int:
    """A numeric header: 1 to 18 ASCII digits, else 400 naming the header."""
    if not _ASCII_DIGITS.fullmatch(value):
        raise _bad(f"header {name} {value[:40]!r} is not a number of ASCII digits")
    return int(value)


def _flat(data: list[Any]) -> Iterator[Any]:
    for v in data:
        if isinstance(v, list):
            yield from _flat(v)
        else:
            yield v


def _first_bad(data: list[Any], ok: Callable[[Any], bool]) -> str:
    """``data[i] is ...`` for the first flat element that ``ok`` refuses (only on the error path)."""
    for i, v in enumerate(_flat(data)):
        if not ok(v):
            what = "null" if v is None else f"{type(v).__name__} {str(v)[:20]!r}"
            return f"data[{i}] is {what}"
    return "data has values of mixed types"


def _json_values(
    name: str, data: list[Any], datatype: str, dtype: np.dtype[Any], has_bools: bool = True
) -> np.ndarray:
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
    with np.errstate(over="ignore", invalid="ignore"):  # beyond FP32/FP16's range -> inf, refused just below
        out = arr.astype(dtype)
        # one reduction: a float64 sum of finite halves/floats is finite, of anything with inf or NaN not
        total = np.add.reduce(out, axis=None, dtype=np.float64)
    if not math.isfinite(total):
        raise _bad(f"input '{name}': data has values beyond {datatype}'s range (a finite number is needed)")
    return out


def decode_rest_request(body: bytes | bytearray, header_length: int | None, model: LoadedModel,
                        lease: Lease | None = None) -> InferRequest:
    """An OIP REST infer body (JSON, or JSON + binary tensor data) as the data plane's request for ``model``.
    Encoded images (BYTES) for the input of the model's declared pre-processing are left to the data plane."""
    req_id, feeds, wanted = decode_infer_request(body, header_length, model.name, model.inputs, model.outputs, lease,
                                                 model.encoded)
    return InferRequest(model, feeds, [RequestedOutput(n, b) for n, b in wanted], req_id)


IMAGE_TYPES = ("image/jpeg", "image/png")


def decode_image_request(body: bytes | bytearray, content_type: str, model: LoadedModel) -> InferRequest:
    """An image/jpeg or image/png body: one encoded image for the input the declared pre-processing feeds (the
    data plane decodes it), answered with every output as JSON; 415 naming the fix otherwise."""
    if not model.encoded:
        raise RequestError(415, f"model '{model.name}' declares no image pre-processing "
                                "(EdgeModel spec.preprocessing.image); send Open Inference Protocol JSON")
    if content_type not in IMAGE_TYPES:
        raise RequestError(415, f"Content-Type {content_type} is not supported; send image/jpeg or image/png")
    name = next(iter(model.encoded))
    image = np.empty(1, dtype=object)
    image[0] = bytes(body)
    return InferRequest(model, {name: image}, [RequestedOutput(n) for n in model.outputs])


def decode_infer_request(
    body: bytes | bytearray,
    header_length: int | None,
    model_name: str,
    inputs: Mapping[str, TensorSpec],
    outputs: Mapping[str, TensorSpec],
    lease: Lease | None = None,
    encoded: Mapping[str, TensorSpec] | None = None,
) -> tuple[str | None, dict[str, np.ndarray], list[tuple[str, bool]]]:
    """Return ``(request_id, feeds, [(output_name, binary)])`` or raise RequestError. ``lease``: what decoding
    grows by (binary BYTES) is charged to it; ``encoded``: inputs that also take BYTES (encoded images)."""
    if header_length is None:
        json_part, binary = memoryview(body), memoryview(b"")
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
        datatype, shape = spec.datatype, cast(list[int], shape)  # as checked
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
                arr = decode_bytes_tensor(chunk, count, name, lease)
            else:
                if bsize != count * dtype.itemsize:
                    raise _bad(
                        f"input '{name}': binary_data_size {bsize} does not match shape {fmt_shape(shape)} "
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
                raise _bad(f"input '{name}': data has {arr.size} values but shape {fmt_shape(shape)} needs {count}")
        feeds[name] = arr.reshape(shape)
    if offset != len(binary):
        raise _bad(f"binary tensor data has {len(binary) - offset} bytes that no input claims")
    check_missing(model_name, inputs, feeds)

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


def encode_rest_response(resp: InferResponse) -> tuple[bytes, int | None]:
    """Return ``(body, json_header_length or None)``: JSON, with binary outputs appended after it."""
    outs = []
    blobs: list[bytes] = []
    for o in resp.outputs:
        arr = o.data
        datatype = NP_TO_OIP.get(arr.dtype, "BYTES")
        entry: dict[str, Any] = {"name": o.name, "datatype": datatype, "shape": list(arr.shape)}
        if o.binary:
            blob = tensor_to_binary(arr, datatype)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif datatype == "BYTES":
            entry["data"] = [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in arr.ravel()]
        elif datatype == "FP16":
            entry["data"] = arr.astype(np.float32).ravel()
        else:
            entry["data"] = np.ascontiguousarray(arr).ravel()
        outs.append(entry)
    out: dict[str, Any] = {"model_name": resp.model_name, "model_version": resp.model_version, "outputs": outs}
    if resp.id is not None:
        out["id"] = resp.id
    head = orjson.dumps(out, option=orjson.OPT_SERIALIZE_NUMPY)
    if blobs:
        return head + b"".join(blobs), len(head)
    return head, None
