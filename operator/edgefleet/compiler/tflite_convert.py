"""ONNX -> .tflite with onnx2tf + TensorFlow (the ``tflite-convert`` extra), in a child process.

TensorFlow costs seconds and hundreds of MB to import, so each conversion runs in a child Python
(``python -m edgefleet.compiler.tflite_convert WORKDIR QUANTIZATION``): fp32 (``none``), dynamic-range
int8, or full int8 with int8 inputs and outputs (what the Edge TPU needs). The first child runs onnx2tf
and keeps a SavedModel in WORKDIR; later children convert that SavedModel, so onnx2tf runs once per model.

The result keeps the source's interface, so the runtime serves it with the requests the ONNX model
takes: NCHW inputs stay NCHW (onnx2tf's ``keep_ncw_or_nchw_or_ncdhw_input_names``), outputs that
onnx2tf turned channels-last are transposed back, and input/output tensors carry the ONNX names.
Only TFLite builtin ops are allowed: LiteRT has no TensorFlow (Flex) kernels.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

QUANTIZATIONS = ("none", "dynamic-int8", "static-int8")
NEEDS = ("onnx2tf", "tensorflow", "tf_keras", "onnx_graphsurgeon", "sng4onnx", "psutil", "ai_edge_litert")
INSTALL_FIX = "pip install 'edgefleet[tflite-convert]', or compile in the compile Job (the compiler image carries it)"
TIMEOUT_SECONDS = 1800
FLEX_MARKERS = ("Select TF ops", "not supported by the native TFLite runtime", "neither a custom op nor a flex op")
TF_OP = re.compile(r"'tf\.(\w+)' op is neither")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def missing() -> str | None:
    """Why ONNX -> .tflite cannot run here, or None when the toolchain is importable."""
    absent = [m for m in NEEDS if importlib.util.find_spec(m) is None]
    if not absent:
        return None
    return (f"ONNX -> .tflite needs onnx2tf + TensorFlow (missing here: {', '.join(absent)}); "
            f"fix: {INSTALL_FIX}")


def flavours(wanted: list[str], delegate: str | None) -> list[str]:
    """The quantizations to build, in ``wanted``'s order. A delegate (Edge TPU) runs only full int8."""
    allowed = ("static-int8",) if delegate else QUANTIZATIONS
    return [w for w in wanted if w in allowed]


def build(onnx_model: bytes, quantization: str, calib: dict[str, np.ndarray] | None, workdir: Path,
          say: Callable[[str], None] = lambda _m: None, shapes: dict[str, tuple[int, ...]] | None = None) -> bytes:
    """The ``quantization`` flavour of ``onnx_model`` as .tflite bytes (converted once per workdir).

    ``shapes`` (input name -> a sample shape, e.g. the evaluation data's) fixes dynamic dims other than
    the batch: onnx2tf bakes shapes into some ops (TRANSPOSE_CONV), so the .tflite takes those sizes."""
    from .types import CompileError

    if quantization not in QUANTIZATIONS:
        raise CompileError("PassFailed", f"onnx2tf builds {', '.join(QUANTIZATIONS)}, not {quantization}")
    if quantization == "static-int8" and calib is None:
        raise CompileError("NoCalibrationData", "full int8 .tflite (int8 inputs and outputs) needs calibration data",
                           "pass --calibration DATA (.npz or a directory of .npy, ~100 samples)")
    workdir = Path(workdir)
    report = workdir / f"{quantization}.json"
    if not report.exists():
        _run_child(pin_dims(onnx_model, shapes or {}), quantization, calib, workdir, say)
    error = json.loads(report.read_text()).get("error")
    if error:
        raise _error(error)
    return (workdir / f"{quantization}.tflite").read_bytes()


def _run_child(onnx_model: bytes, quantization: str, calib: dict[str, np.ndarray] | None, workdir: Path,
               say: Callable[[str], None]) -> None:
    from .types import CompileError

    why = missing()
    if why:
        raise CompileError("MissingExtra", why.split("; fix: ")[0], INSTALL_FIX)
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "model.onnx").exists():
        (workdir / "model.onnx").write_bytes(onnx_model)
    if calib is not None and not (workdir / "calib.npz").exists():
        np.savez(workdir / "calib.npz", **calib)  # type: ignore[arg-type]  # numpy stubs: kwargs are arrays
    first = not (workdir / "saved_model").exists()
    say(f"pass: {'onnx2tf + ' if first else ''}TensorFlow -> .tflite {quantization} (child process)")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="", TF_ENABLE_ONEDNN_OPTS="0")
    t0 = time.perf_counter()
    log_path = workdir / f"{quantization}.log"
    with open(log_path, "wb") as log:
        try:
            proc = subprocess.run([sys.executable, "-m", __name__, str(workdir), quantization], cwd=workdir,
                                  env=env, stdout=log, stderr=subprocess.STDOUT, timeout=TIMEOUT_SECONDS,
                                  check=False)
        except subprocess.TimeoutExpired as e:
            raise CompileError("PassFailed", f"onnx2tf did not finish in {TIMEOUT_SECONDS} s",
                               "compile this model in the compile Job, which has more time and memory") from e
    report = workdir / f"{quantization}.json"
    if proc.returncode != 0 or not report.exists():
        raise _error(_log_tail(log_path), proc.returncode)
    timing = json.loads(report.read_text())["seconds"]
    if "onnx2tf" in timing and (workdir / "note.txt").exists():
        say(f"pass: {(workdir / 'note.txt').read_text()}")
    say(f"pass: .tflite {quantization} in {time.perf_counter() - t0:.1f} s ("
        + ", ".join(f"{k} {v:.1f} s" for k, v in timing.items()) + ")")


def _log_tail(log: Path) -> str:
    lines = [ANSI.sub("", ln) for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln or "ERROR" in ln]
    return (errors or lines or ["no output"])[-1][:400]


def _error(message: str, code: int | None = None):
    from .types import CompileError

    if any(m in message for m in FLEX_MARKERS):
        ops = sorted(set(TF_OP.findall(message)))
        return CompileError("UnsupportedOperator",
                            "the converted model needs TensorFlow ops that LiteRT has no kernel for: "
                            + (", ".join(ops) if ops else message[:300]),
                            "serve this model as ONNX on this class, or re-export it without these operators")
    exit_note = f" (exit {code})" if code else ""
    return CompileError("PassFailed", f"onnx2tf could not convert the model{exit_note}: {message}",
                        "check the model with onnx2tf directly (onnx2tf -i model.onnx) and simplify it with onnxsim")


# ----------------------------------------------------------------------------- shared with the child
def nchw_perm(converted: list[int | None], onnx_shape: list[int | None]) -> list[int] | None:
    """The permutation that turns a channels-last output back into the ONNX layout, or None if none is needed.

    ``None`` dims match anything. Raises ValueError when neither layout fits."""
    def fits(a, b):
        return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b, strict=True))

    if fits(converted, onnx_shape):
        return None
    rank = len(converted)
    perm = [0, rank - 1, *range(1, rank - 1)]  # NHWC -> NCHW (and NWC -> NCW, NDHWC -> NCDHW)
    if rank >= 3 and fits([converted[p] for p in perm], onnx_shape):
        return perm
    raise ValueError(f"converted output shape {converted} does not match the ONNX shape {onnx_shape}")


def pin_dims(onnx_model: bytes, shapes: dict[str, tuple[int, ...]]) -> bytes:
    """``onnx_model`` with its dynamic input dims after the first set from ``shapes``."""
    import onnx

    model = onnx.load_from_string(onnx_model)
    changed = False
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        for axis, size in list(enumerate(shapes.get(inp.name, ())))[1:]:
            if axis < len(dims) and not dims[axis].HasField("dim_value"):
                dims[axis].dim_value = int(size)
                changed = True
    return model.SerializeToString() if changed else onnx_model


def rename_io(tflite: bytes, renames: dict[str, str]) -> bytes:
    """Rename input/output tensors and signature keys of a .tflite: ``{current name: new name}``."""
    from ai_edge_litert.tools import flatbuffer_utils as fb

    model = fb.read_model_from_bytearray(bytearray(tflite))
    sg = model.subgraphs[0]
    for idx in [*sg.inputs, *sg.outputs]:
        old = _text(sg.tensors[idx].name)
        if old in renames:
            sg.tensors[idx].name = renames[old].encode()
    for sig in model.signatureDefs or []:
        for t in [*sig.inputs, *sig.outputs]:
            t.name = renames.get(_text(t.name), _text(t.name)).encode()
    return bytes(fb.convert_object_to_bytearray(model))


def _text(name) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)


# ----------------------------------------------------------------------------- the child
def _child(workdir: Path, quantization: str) -> None:
    """WORKDIR/model.onnx -> WORKDIR/<quantization>.tflite and WORKDIR/<quantization>.json."""
    seconds: dict[str, float] = {}
    report = workdir / f"{quantization}.json"
    failed = workdir / "onnx2tf-error.txt"
    if failed.exists():  # onnx2tf already failed on this model: fail fast, without TensorFlow
        report.write_text(json.dumps({"error": failed.read_text(), "seconds": seconds}))
        return
    t0 = time.perf_counter()
    import tensorflow as tf

    seconds["import"] = time.perf_counter() - t0
    if not (workdir / "saved_model").exists():
        t0 = time.perf_counter()
        try:
            _saved_model(tf, workdir, "model.onnx")
        except (Exception, SystemExit) as e:  # onnx2tf exits on some unsupported graphs
            first = f"onnx2tf: {type(e).__name__}: {' '.join(str(e).split())[:600]}"
            if not _batch_one(workdir) or not _retry(tf, workdir):
                failed.write_text(first)
                report.write_text(json.dumps({"error": first, "seconds": seconds}))
                return
            (workdir / "note.txt").write_text("batch fixed to 1: onnx2tf could not convert a dynamic batch "
                                              f"({first[:200]})")
        seconds["onnx2tf"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    error = None
    try:
        keys = json.loads((workdir / "io.json").read_text())
        data = _tflite(tf, workdir, quantization, keys)
        (workdir / f"{quantization}.tflite").write_bytes(rename_io(data, _io_renames(data, keys)))
    except Exception as e:  # reported to the parent as this flavour's failure
        error = f"{type(e).__name__}: {' '.join(str(e).split())[:600]}"
    seconds["convert"] = time.perf_counter() - t0
    report.write_text(json.dumps({"error": error, "seconds": seconds}))


def _batch_one(workdir: Path) -> bool:
    """WORKDIR/model-batch1.onnx: model.onnx with dynamic batch dims set to 1; False if it has none."""
    import onnx

    model = onnx.load(str(workdir / "model.onnx"))
    dims = [i.type.tensor_type.shape.dim for i in model.graph.input]
    dynamic = [d[0] for d in dims if len(d) and not d[0].HasField("dim_value")]
    for d in dynamic:
        d.dim_value = 1
    onnx.save(model, str(workdir / "model-batch1.onnx"))
    return bool(dynamic)


def _retry(tf, workdir: Path) -> bool:
    import tf_keras

    tf_keras.backend.clear_session()
    try:
        _saved_model(tf, workdir, "model-batch1.onnx")
    except (Exception, SystemExit):
        return False
    return True


def _saved_model(tf, workdir: Path, onnx_file: str) -> None:
    """onnx2tf -> Keras -> WORKDIR/saved_model with one signature whose keys are in0.., out0000..;
    WORKDIR/io.json maps those keys to the ONNX input and output names."""
    import onnx
    import onnx2tf

    source = onnx.load(str(workdir / onnx_file))
    inits = {i.name for i in source.graph.initializer}
    in_names = [i.name for i in source.graph.input if i.name not in inits]
    outs = source.graph.output
    out_shapes = [[d.dim_value if d.HasField("dim_value") else None for d in o.type.tensor_type.shape.dim]
                  for o in outs]
    keras_model = onnx2tf.convert(input_onnx_file_path=str(workdir / onnx_file),
                                  output_folder_path=str(workdir / "onnx2tf"), non_verbose=True,
                                  keep_ncw_or_nchw_or_ncdhw_input_names=in_names)
    perms = [nchw_perm([d if isinstance(d, int) else None for d in t.shape], s)
             for t, s in zip(keras_model.outputs, out_shapes, strict=True)]
    specs = [tf.TensorSpec(t.shape, t.dtype, name=f"in{i}") for i, t in enumerate(keras_model.inputs)]

    @tf.function(input_signature=specs)
    def serve(*xs):
        ys = keras_model(list(xs))
        ys = ys if isinstance(ys, list | tuple) else [ys]
        return {f"out{i:04d}": tf.transpose(y, p) if p else y for i, (y, p) in enumerate(zip(ys, perms, strict=True))}

    module = tf.Module()
    module.model, module.serve = keras_model, serve
    partial = workdir / "saved_model.partial"
    tf.saved_model.save(module, str(partial), signatures={"serving_default": serve})
    keys = {f"in{i}": n for i, n in enumerate(in_names)} | {f"out{i:04d}": o.name for i, o in enumerate(outs)}
    (workdir / "io.json").write_text(json.dumps(keys))
    os.replace(partial, workdir / "saved_model")


def _tflite(tf, workdir: Path, quantization: str, keys: dict[str, str]) -> bytes:
    conv = tf.lite.TFLiteConverter.from_saved_model(str(workdir / "saved_model"), signature_keys=["serving_default"])
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantization != "none":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantization == "static-int8":
        with np.load(workdir / "calib.npz") as z:
            calib = {k: z[name] for k, name in keys.items() if k.startswith("in")}
        n = len(next(iter(calib.values())))
        conv.representative_dataset = lambda: ({k: a[i : i + 1] for k, a in calib.items()} for i in range(n))
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.int8
        conv.inference_output_type = tf.int8
    return conv.convert()


def _io_renames(data: bytes, keys: dict[str, str]) -> dict[str, str]:
    """{tensor name or signature key: ONNX name}, from the serving signature's keys (``in0``, ``out0000``)."""
    from ai_edge_litert.tools import flatbuffer_utils as fb

    model = fb.read_model_from_bytearray(bytearray(data))
    tensors = model.subgraphs[0].tensors
    sig = model.signatureDefs[0]
    renames = dict(keys)
    for t in [*sig.inputs, *sig.outputs]:
        renames[_text(tensors[t.tensorIndex].name)] = keys[_text(t.name)]
    return renames


if __name__ == "__main__":
    _child(Path(sys.argv[1]), sys.argv[2])
