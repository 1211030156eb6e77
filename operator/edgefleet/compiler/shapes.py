"""The input shapes the compiler measures candidates on, and where each comes from.

A model input's dims are known from, in this order: an explicit shape (``--input-shape NAME=1x3x48x192``,
EdgeModel ``spec.optimization.inputShapes``), the model's own metadata (its declared static dims, or the
ONNX metadata property ``edgefleet.input_shapes``: JSON ``{"NAME": [1, 3, 48, 192]}``), the evaluation
data, or the calibration data. A non-batch dim none of them fixes is unknown: `quantization: auto` then
refuses rather than rank candidates measured on made-up inputs.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np

from .measure import InputSpec
from .types import CompileError

METADATA_KEY = "edgefleet.input_shapes"
_SHAPE = re.compile(r"^([^=\s]+)=(\d+(?:x\d+)*)$")


def parse_input_shape(text: str) -> tuple[str, list[int]]:
    """``NAME=1x3x48x192`` -> ("NAME", [1, 3, 48, 192])."""
    found = _SHAPE.match(text.strip())
    if not found or any(int(d) < 1 for d in found.group(2).split("x")):
        raise CompileError("InvalidRequest", f"--input-shape {text!r} is not NAME=DIMxDIM... with dims >= 1",
                           "write it like input=1x3x48x192 (the model input's name, then every dim)")
    return found.group(1), [int(d) for d in found.group(2).split("x")]


def onnx_metadata_shapes(model_bytes: bytes) -> dict[str, list[int]]:
    """Shapes the model's author wrote into the ONNX metadata property ``edgefleet.input_shapes``."""
    import onnx

    model = onnx.load_from_string(model_bytes)
    raw = next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None)
    if raw is None:
        return {}
    try:
        shapes = json.loads(raw)
        if not isinstance(shapes, dict):
            raise ValueError("not a JSON object")
        return {str(k): [int(d) for d in v] for k, v in shapes.items()}
    except (ValueError, TypeError) as err:
        raise CompileError("InvalidModel", f"the model's metadata {METADATA_KEY} is not JSON like "
                           f'{{"input": [1, 3, 48, 192]}} ({err})',
                           "fix the metadata property or pass --input-shape instead") from err


def apply_shapes(inputs: list[InputSpec], shapes: dict[str, list[int]], source: str) -> list[InputSpec]:
    """`inputs` with their dynamic dims filled from `shapes` (per input name); the batch dim stays free."""
    names = {i.name for i in inputs}
    unknown = sorted(set(shapes) - names)
    if unknown:
        raise CompileError("InvalidRequest", f"{source} names inputs {unknown} the model does not have "
                           f"(its inputs: {sorted(names)})", "use the model's input names")
    out = []
    for spec in inputs:
        want = shapes.get(spec.name)
        if want is None:
            out.append(spec)
            continue
        if len(want) != len(spec.shape) or any(d is not None and d != w for d, w in zip(spec.shape[1:], want[1:],
                                                                                         strict=False)):
            shown = ["?" if d is None else d for d in spec.shape]
            raise CompileError("InvalidRequest", f"{source} gives input {spec.name!r} shape {want}, the model "
                               f"declares {shown}", "give every dim, matching the ones the model fixes")
        out.append(replace(spec, shape=[spec.shape[0], *want[1:]]))
    return out


def with_data_shapes(inputs: list[InputSpec], feeds: dict[str, np.ndarray] | None) -> list[InputSpec]:
    """`inputs` with dynamic non-batch dims taken from data (calibration) that binds to them."""
    if not feeds:
        return inputs
    return [replace(s, shape=[s.shape[0], *feeds[s.name].shape[1:]]) if s.name in feeds else s for s in inputs]


def unknown_dims(inputs: list[InputSpec]) -> dict[str, list[int | None]]:
    """Inputs whose non-batch dims are not all known: name -> shape with None for the unknown dims."""
    return {s.name: s.shape for s in inputs if any(d is None for d in s.shape[1:])}


def refuse_guessing(unknown: dict[str, list[int | None]]) -> CompileError:
    """The error for `quantization: auto` when some input dims are unknown."""
    name, shape = next(iter(sorted(unknown.items())))
    shown = "x".join("?" if d is None else str(d) for d in shape)
    example = "x".join(str(d) if d is not None else "N" for d in [1, *shape[1:]])
    return CompileError(
        "UnknownInputShape",
        f"input {name!r} has shape {shown}: no evaluation data, calibration data, model metadata or "
        "--input-shape says what its dynamic dims are, so quantization auto would rank candidates measured on "
        "made-up inputs",
        f"pass --input-shape {name}={example} with the real dims (EdgeModel: spec.optimization.inputShapes), or "
        "evaluation data (--eval), or choose a quantization yourself")
