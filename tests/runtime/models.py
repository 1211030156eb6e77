"""Small real models for the runtime tests and benchmark, built without a hub download.

``digits_onnx`` prefers the committed fixture ``tests/fixtures/models/digits_cnn.onnx`` and falls back
to a small CNN of the same signature (input ``input`` [N,1,8,8] float32 -> 10 logits) built with
onnx.helper. ``int8_tflite`` writes a quantized FULLY_CONNECTED LiteRT model with the flatbuffer
schema that ships in ai-edge-litert (no TensorFlow needed).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "fixtures" / "models" / "digits_cnn.onnx"


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build_cnn(path: Path, seed: int = 0) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.5, (8, 1, 3, 3)).astype(np.float32)
    b1 = rng.normal(0, 0.1, (8,)).astype(np.float32)
    w2 = rng.normal(0, 0.1, (8 * 8 * 8, 10)).astype(np.float32)
    b2 = rng.normal(0, 0.1, (10,)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Flatten", ["r1"], ["f1"], axis=1),
        helper.make_node("Gemm", ["f1", "w2", "b2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_cnn_fallback",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def digits_onnx(dest_dir: Path, variant: int = 0) -> Path:
    """Variant 0: the committed fixture when present (else the fallback CNN); other variants: new weights."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f"digits_v{variant}.onnx"
    if variant == 0 and FIXTURE.exists():
        shutil.copyfile(FIXTURE, dest)
        return dest
    return build_cnn(dest, seed=variant)


def int8_tflite(path: Path, seed: int = 0):
    """An int8 FULLY_CONNECTED model: input 'x' [1,16] -> output 'y' [1,4]. Returns (path, reference fn)."""
    from ai_edge_litert import schema_py_generated as s
    from ai_edge_litert.tools import flatbuffer_utils

    rng = np.random.default_rng(seed)
    in_scale, in_zp = 1 / 64, 3
    w_scale = 1 / 32
    out_scale, out_zp = 1 / 8, -5
    w = rng.integers(-60, 60, (4, 16)).astype(np.int8)
    bias = rng.integers(-500, 500, (4,)).astype(np.int32)

    def q(scale, zp):
        p = s.QuantizationParametersT()
        p.scale, p.zeroPoint = [scale], [zp]
        return p

    def tensor(name, shape, ttype, buf, quant):
        t = s.TensorT()
        t.name, t.shape, t.type, t.buffer, t.quantization = name, shape, ttype, buf, quant
        return t

    buffers = []
    for data in (b"", b"", w.tobytes(), bias.tobytes(), b""):
        b = s.BufferT()
        b.data = list(data) if data else None
        buffers.append(b)
    sg = s.SubGraphT()
    sg.tensors = [
        tensor("x", [1, 16], s.TensorType.INT8, 1, q(in_scale, in_zp)),
        tensor("w", [4, 16], s.TensorType.INT8, 2, q(w_scale, 0)),
        tensor("b", [4], s.TensorType.INT32, 3, q(in_scale * w_scale, 0)),
        tensor("y", [1, 4], s.TensorType.INT8, 4, q(out_scale, out_zp)),
    ]
    sg.inputs, sg.outputs = [0], [3]
    op = s.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1, 2], [3]
    op.builtinOptionsType = s.BuiltinOptions.FullyConnectedOptions
    op.builtinOptions = s.FullyConnectedOptionsT()
    sg.operators = [op]
    code = s.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = s.BuiltinOperator.FULLY_CONNECTED
    code.version = 4
    model = s.ModelT()
    model.version, model.operatorCodes, model.subgraphs, model.buffers = 3, [code], [sg], buffers
    model.description = "edgefleet test int8 fc"
    flatbuffer_utils.write_model(model, str(path))

    def reference(x: np.ndarray) -> np.ndarray:
        xq = np.clip(np.round(x / in_scale) + in_zp, -128, 127)
        acc = (xq - in_zp) @ w.astype(np.float64).T + bias
        yq = np.clip(np.round(acc * in_scale * w_scale / out_scale) + out_zp, -128, 127)
        return ((yq - out_zp) * out_scale).astype(np.float32)

    return path, reference


QUICKSTART = REPO / "examples" / "quickstart"


def head_update(dest: Path, epochs: int = 3, learning_rate: float = 0.1, samples: int = 200) -> tuple[Path, Path]:
    """A federated-style head update of the quickstart's digits CNN: its last layer fine-tuned with the project's
    own trainer (edgefleet_runtime.federated.trainer) on the first ``samples`` of digits_eval.npz, every other
    byte unchanged. Returns (base, updated) model files."""
    from edgefleet_runtime.federated.trainer import HeadModel, train

    dest.mkdir(parents=True, exist_ok=True)
    base = dest / "digits_base.onnx"
    shutil.copyfile(QUICKSTART / "digits_cnn.onnx", base)
    data = np.load(QUICKSTART / "digits_eval.npz")
    model = HeadModel(base.read_bytes())
    features = model.features({"input": data["input"][:samples]})
    head = train(model.head, features, data["y"][:samples], epochs=epochs, learning_rate=learning_rate)
    updated = dest / "digits_head_update.onnx"
    updated.write_bytes(model.with_head(head))
    return base, updated


def swapped_classes(dest: Path) -> Path:
    """The quickstart's digits CNN with its head's classes rotated by one (logits of class k answer for k+1): a
    variant that runs fine and disagrees with the original on every input."""
    from edgefleet_runtime.federated.trainer import Head, HeadModel

    model = HeadModel((QUICKSTART / "digits_cnn.onnx").read_bytes())
    order = np.roll(np.arange(model.head.w.shape[1]), 1)
    out = dest / "digits_swapped.onnx"
    dest.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.with_head(Head(model.head.w[:, order].copy(), model.head.b[order].copy())))
    return out


def reference_outputs(path: Path, inputs: np.ndarray) -> np.ndarray:
    """The logits ONNX Runtime gives for ``inputs`` with the model at ``path`` (what a served answer must equal)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: inputs})[0]
