"""LiteRT (.tflite): op listing for preflight, and int8 with ai-edge-quantizer (no TensorFlow)."""

from __future__ import annotations

import contextlib
import io

import numpy as np

from .types import CompileError

TFLITE_MEDIA = "application/vnd.edgefleet.model.tflite"


def is_tflite(data: bytes) -> bool:
    return len(data) >= 8 and data[4:8] == b"TFL3"


def _require():
    try:
        from ai_edge_litert.tools import flatbuffer_utils  # noqa: F401
    except ImportError as e:
        raise CompileError("MissingExtra", "LiteRT support needs ai-edge-litert, which is not installed",
                           "pip install 'edgefleet[litert]'") from e


def list_ops(data: bytes) -> tuple[list[str], list[str]]:
    """(builtin op names, custom op names) read from the flatbuffer, without running it."""
    _require()
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils as fb

    try:
        model = fb.read_model_from_bytearray(bytearray(data))
    except Exception as e:
        raise CompileError("InvalidModel", f"the .tflite flatbuffer is unreadable ({type(e).__name__}: {e})",
                           "check that the file is complete (not truncated)") from e
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    builtin, custom = [], []
    for oc in model.operatorCodes:
        code = fb.get_builtin_code_from_operator_code(oc)
        if oc.customCode:
            custom.append(oc.customCode.decode() if isinstance(oc.customCode, bytes) else str(oc.customCode))
        else:
            builtin.append(names.get(code, str(code)))
    return sorted(set(builtin)), sorted(set(custom))


def has_signatures(data: bytes) -> bool:
    from ai_edge_litert.interpreter import Interpreter

    return bool(Interpreter(model_content=bytes(data)).get_signature_list())


def weights_precision(data: bytes) -> str:
    """"fp16" when the float weights are stored as fp16 behind DEQUANTIZE ops (MediaPipe style)."""
    builtin, _ = list_ops(data)
    return "fp16" if "DEQUANTIZE" in builtin else "fp32"


def preflight(data: bytes) -> None:
    """Every op must be runnable by LiteRT: custom ops fail at allocate_tensors, say so up front."""
    _, custom = list_ops(data)
    from ai_edge_litert.interpreter import Interpreter

    try:
        Interpreter(model_content=bytes(data)).allocate_tensors()
    except Exception as e:
        if custom:
            raise CompileError(
                "UnsupportedOperator",
                f"the model uses custom ops {custom} that LiteRT does not provide ({str(e).splitlines()[0]})",
                "serve it with the runtime that registers these ops (e.g. MediaPipe) or re-export without them",
            ) from e
        raise CompileError("InvalidModel", f"LiteRT cannot load the model ({str(e).splitlines()[0]})",
                           "check that the file is complete and was produced by a LiteRT/TFLite converter") from e


def quantize(data: bytes, recipe_name: str, calib: list[dict[str, np.ndarray]] | None = None) -> bytes:
    """ai-edge-quantizer with a named recipe (dynamic_wi8_afp32, weight_only_wi8_afp32, static_wi8_ai8)."""
    try:
        from ai_edge_quantizer import quantizer, recipe
    except ImportError as e:
        raise CompileError("MissingExtra", "int8 for .tflite needs ai-edge-quantizer, which is not installed",
                           "pip install 'edgefleet[litert]'") from e
    q = quantizer.Quantizer(bytearray(data), getattr(recipe, recipe_name)())
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        result = None
        if q.need_calibration:
            if not calib:
                raise CompileError("InvalidData", "static int8 needs calibration data", "pass --calibration")
            sig = {"serving_default": calib}
            result = q.calibrate(sig)
        res = q.quantize(result, enable_progress_report=False) if result else q.quantize(
            enable_progress_report=False)
    return bytes(res.quantized_model)
