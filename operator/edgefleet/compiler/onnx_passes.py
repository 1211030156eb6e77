"""ONNX passes: normalize, graph-optimize (fp32 baseline), fp16, dynamic/static int8, magnitude pruning.

Each pass takes and returns serialized model bytes, so candidates are independent and hashable.
"""

from __future__ import annotations

import gzip
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .types import CompileError

MIN_QUANT_OPSET = 13  # per-channel QDQ needs opset >= 13
GZIP_MEDIA = "application/vnd.edgefleet.model.onnx+gzip"
ONNX_MEDIA = "application/vnd.edgefleet.model.onnx"


def load(data: bytes) -> onnx.ModelProto:
    try:
        return onnx.load_from_string(data)
    except Exception as e:
        raise CompileError(
            "InvalidModel", f"the source is not a readable ONNX or TFLite model ({type(e).__name__}: {e})",
            "check that the file is complete (not truncated) and is an .onnx or .tflite model",
        ) from e


def default_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 0


def normalize(data: bytes, stats: dict | None = None) -> bytes:
    """Constant-node weights -> initializers; opset upgraded to >= 13 where needed; validated.

    Exporters such as paddle2onnx (PP-OCR) store every weight as a ``Constant`` node; quantizers need
    initializers (``Expected ... to be an initializer``) and per-channel QDQ needs opset >= 13.
    ``stats`` (optional) receives ``constantsMoved``, ``opsetFrom``, ``opsetTo``, ``initializers``.
    """
    model = load(data)
    g = model.graph
    outputs = {o.name for o in g.output}
    keep = []
    moved = 0
    for node in g.node:
        if (node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1
                and node.attribute[0].name == "value" and node.output[0] not in outputs):
            t = onnx.TensorProto()
            t.CopyFrom(node.attribute[0].t)
            t.name = node.output[0]
            g.initializer.append(t)
            moved += 1
        else:
            keep.append(node)
    if moved:
        del g.node[:]
        g.node.extend(keep)
    # initializers that are also graph inputs (old exporters) make them overridable: drop from inputs
    init_names = {i.name for i in g.initializer}
    if any(i.name in init_names for i in g.input) and model.ir_version >= 4:
        real = [i for i in g.input if i.name not in init_names]
        del g.input[:]
        g.input.extend(real)
    opset = default_opset(model)
    if stats is not None:
        stats.update(constantsMoved=moved, opsetFrom=opset, opsetTo=max(opset, MIN_QUANT_OPSET),
                     initializers=len(g.initializer))
    if opset < MIN_QUANT_OPSET:
        from onnx import version_converter

        try:
            model = version_converter.convert_version(model, MIN_QUANT_OPSET)
        except Exception as e:
            raise CompileError(
                "UnsupportedOpset",
                f"opset {opset} could not be upgraded to {MIN_QUANT_OPSET} ({e})",
                f"re-export the model with opset >= {MIN_QUANT_OPSET}",
            ) from e
    return model.SerializeToString()


def load_unoptimized(data: bytes) -> None:
    """Load `data` in ONNX Runtime with graph optimizations off: raises unless every node has a kernel."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def optimize(data: bytes, level: str = "basic") -> bytes:
    """ONNX Runtime offline graph optimization (constant folding, redundant node removal).

    ``basic`` keeps only standard ONNX ops, so the result runs on every ONNX runtime and EP.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }[level]
    so.intra_op_num_threads = 1
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "opt.onnx"
        so.optimized_model_filepath = str(out)
        ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        model = onnx.load(str(out))
    model.producer_name = "edgefleet"
    model.producer_version = ""
    return model.SerializeToString()


# op -> its inputs that carry shapes, sizes, axes or repeat counts rather than data
SHAPE_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "Resize": (1, 2, 3), "Upsample": (1,),
    "Slice": (1, 2, 3, 4), "ConstantOfShape": (0,), "Range": (0, 1, 2), "Pad": (1, 3), "Squeeze": (1,),
    "Unsqueeze": (1,), "TopK": (1,), "OneHot": (1,), "Split": (1,), "CenterCropPad": (1,),
    "ReduceSum": (1,), "ReduceMean": (1,), "ReduceMax": (1,), "ReduceMin": (1,), "ReduceProd": (1,),
}


def shape_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes that compute shapes: everything upstream of a shape input (see SHAPE_INPUTS), up
    to the Shape and Size nodes whose input's values do not matter. In fp16 their float arithmetic would
    round sizes (4097 -> 4096) and a Reshape or Resize would fail or change the result."""
    producer = {out: node for node in model.graph.node for out in node.output}
    todo = [node.input[i] for node in model.graph.node for i in SHAPE_INPUTS.get(node.op_type, ())
            if i < len(node.input) and node.input[i]]
    seen: set[str] = set()
    found: list[str] = []
    while todo:
        tensor = todo.pop()
        node = producer.get(tensor)
        if tensor in seen or node is None:
            continue
        seen.update(node.output)
        found.append(node.name)
        if node.op_type not in ("Shape", "Size"):
            todo.extend(i for i in node.input if i)
    return found


def _no_fp16_between(graph: onnx.GraphProto, kept: set[str]) -> None:
    """The converter casts a kept node's float output to fp16 even when only kept nodes read it, which rounds
    the value on its way from fp32 to fp32: such casts are dropped and their readers take the fp32 value."""
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    dropped = []
    for node in graph.node:
        to_fp16 = node.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT16
                                                   for a in node.attribute)
        source = producer.get(node.input[0]) if node.input else None
        users = readers.get(node.output[0], [])
        if to_fp16 and source is not None and source.name in kept and users and node.output[0] not in outputs \
                and all(u.name in kept for u in users):
            for user in users:
                user.input[:] = [node.input[0] if i == node.output[0] else i for i in user.input]
            dropped.append(node)
    for node in dropped:
        graph.node.remove(node)
    gone = {n.output[0] for n in dropped}
    for vi in [v for v in graph.value_info if v.name in gone]:
        graph.value_info.remove(vi)


# ops whose fp16 arithmetic is the usual cause of a converted model leaving its budget: resampling and box/NMS
# heads (coordinates past 2048 lose integer precision), normalisations and reductions (sums of squares overflow
# 65504), exponentials
FP16_SENSITIVE_OPS: tuple[str, ...] = (
    "Resize", "Upsample", "NonMaxSuppression", "RoiAlign", "TopK", "Range", "CumSum", "LayerNormalization",
    "InstanceNormalization", "GroupNormalization", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "Pow",
    "Sqrt", "Exp", "Log", "Softmax", "LogSoftmax", "Einsum",
)
_NODE_IN_ERROR = re.compile(r"(?:Name|node)[: ]*'([^']+)'")


def node_named_in(message: str) -> str | None:
    """The node an ONNX Runtime error names ("... running Sub node. Name:'/model.22/Sub' ..."), if any."""
    m = _NODE_IN_ERROR.search(message)
    return m.group(1) if m else None


def node_names(data: bytes) -> set[str]:
    """Node names as `to_fp16` sees them (unnamed nodes get ``<op>_<index>``)."""
    return {n.name or f"{n.op_type}_{i}" for i, n in enumerate(load(data).graph.node)}


def to_fp16(data: bytes, shapes: dict[str, tuple[int, ...]] | None = None, keep_ops: tuple[str, ...] = (),
            keep_nodes: list[str] | None = None) -> bytes:
    """fp16 weights and compute, fp32 inputs/outputs (onnxruntime.transformers' converter); the nodes that
    compute shapes stay fp32 (`shape_nodes`), and so do nodes of the ``keep_ops`` types and the ``keep_nodes``.

    The converter needs element types only, but gets them from ORT's symbolic shape inference, which
    simplifies every dynamic dimension with sympy: on PP-OCR's Resize chain over dynamic H/W that takes
    ~15 s. ``shapes`` (input name -> one sample's shape, e.g. the evaluation data's) pins the dynamic
    input dims during the conversion only; the original (dynamic) input and output types are restored,
    so the result still accepts every shape the source did.
    """
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load_from_string(data)
    io = {vi.name: onnx.TypeProto() for vi in [*model.graph.input, *model.graph.output]}
    for vi in [*model.graph.input, *model.graph.output]:
        io[vi.name].CopyFrom(vi.type)
    for vi in model.graph.input:
        shape = (shapes or {}).get(vi.name)
        dims = vi.type.tensor_type.shape.dim
        if shape is None or len(shape) != len(dims):
            continue
        for d, n in zip(dims, shape, strict=True):
            if not d.HasField("dim_value"):
                d.Clear()
                d.dim_value = int(n)
    for i, node in enumerate(model.graph.node):  # the converter keeps nodes fp32 by name
        node.name = node.name or f"{node.op_type}_{i}"
    kept = shape_nodes(model) + [n.name for n in model.graph.node
                                 if n.op_type in keep_ops or n.name in (keep_nodes or ())]
    m = OnnxModel(model)
    m.convert_float_to_float16(keep_io_types=True, node_block_list=kept)
    _no_fp16_between(m.model.graph, set(kept))
    for vi in [*m.model.graph.input, *m.model.graph.output]:
        if vi.name in io:
            vi.type.CopyFrom(io[vi.name])
    _forget_pinned_shapes(m.model.graph)
    return m.model.SerializeToString()


def _forget_pinned_shapes(graph: onnx.GraphProto) -> None:
    """Shape inference ran on the pinned input dims and left them in ``value_info``; ONNX Runtime trusts those
    shapes and folds ``Shape`` nodes into constants, so a batch other than the pinned one would fail (a YOLOv8
    head's Sub: "broadcast 2100 by 33600"; PP-OCR's classifier Reshape: "{16,2} to {1,2}"). Element types stay,
    dims go."""
    for vi in graph.value_info:
        if vi.type.HasField("tensor_type"):
            vi.type.tensor_type.ClearField("shape")


def dynamic_int8(data: bytes, keep_nodes: list[str] | tuple[str, ...] = ()) -> bytes:
    """Dynamic int8: int8 per-channel weights, activations quantized at run time; ``keep_nodes`` stay fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        src.write_bytes(data)
        quantize_dynamic(src, dst, per_channel=True, weight_type=QuantType.QInt8, nodes_to_exclude=list(keep_nodes))
        return dst.read_bytes()


OUTLIER_SAMPLES = 8


def activation_outliers(data: bytes, feeds: dict[str, np.ndarray]) -> list[tuple[str, float]]:
    """The MatMul/Gemm nodes with a constant weight, ranked by how heavy-tailed their input activation is on
    ``feeds`` (first OUTLIER_SAMPLES samples): max |x| / rms(x). Dynamic int8 quantizes that activation with one
    scale per tensor, so a few large values (a transformer's FFN after GELU) leave the rest a handful of levels."""
    import onnxruntime as ort

    model = onnx.load_from_string(data)
    consts = {i.name for i in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    nodes = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1
             and n.input[1] in consts and n.input[0] not in consts]
    for name in {n.input[0] for n in nodes} - outputs:
        model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor it names
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(names, {k: v[:OUTLIER_SAMPLES] for k, v in feeds.items()}), strict=True))
    scores = []
    for n in nodes:
        x = np.abs(np.asarray(got[n.input[0]], np.float64))
        rms = float(np.sqrt(np.mean(x * x))) if x.size else 0.0
        scores.append((n.name, float(x.max()) / rms if rms > 0 else 0.0))
    return sorted(scores, key=lambda s: -s[1])


class _Reader:
    def __init__(self, batches: list[dict[str, np.ndarray]]):
        self._it: Iterator[dict[str, np.ndarray]] = iter(batches)

    def get_next(self):
        return next(self._it, None)


def static_int8(data: bytes, calib: list[dict[str, np.ndarray]]) -> bytes:
    """Static QDQ int8 (per-channel weights, MinMax calibration on the user's data)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        src.write_bytes(data)
        quantize_static(
            src, dst, _Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"CalibTensorRangeSymmetric": False},
        )
        return dst.read_bytes()


def prune(data: bytes, sparsity: float) -> bytes:
    """Magnitude pruning: zero the smallest |w| fraction of each Conv/Gemm/MatMul weight tensor."""
    model = onnx.load_from_string(data)
    weight_inputs = set()
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose") and len(node.input) > 1:
            weight_inputs.add(node.input[1])
    for i, init in enumerate(model.graph.initializer):
        if init.name not in weight_inputs or init.data_type != onnx.TensorProto.FLOAT:
            continue
        w = numpy_helper.to_array(init).copy()
        if w.ndim < 2 or w.size < 16:
            continue
        k = int(w.size * sparsity)
        if k == 0:
            continue
        thresh = np.partition(np.abs(w).ravel(), k - 1)[k - 1]
        w[np.abs(w) <= thresh] = 0.0
        model.graph.initializer[i].CopyFrom(numpy_helper.from_array(w, init.name))
    return model.SerializeToString()


def compress(data: bytes) -> bytes:
    """gzip with a fixed header (mtime 0), so equal bytes give equal digests."""
    return gzip.compress(data, compresslevel=9, mtime=0)


