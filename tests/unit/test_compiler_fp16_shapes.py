"""fp16 conversion keeps the subgraphs that compute shapes in fp32 (fp16 rounds 4097 to 4096)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from edgefleet.compiler import onnx_passes
from onnx import TensorProto, helper, numpy_helper


def shape_arithmetic_model() -> bytes:
    """x[1, L] -> Reshape(x, int64(float(Shape(x)) * 0.5 * 2)) -> Relu: the size passes through float math."""
    consts = [numpy_helper.from_array(np.array(0.5, np.float32), "half"),
              numpy_helper.from_array(np.array(2.0, np.float32), "two"),
              numpy_helper.from_array(np.full((1, 1), 0.25, np.float32), "scale")]
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["sf", "half"], ["h"]), helper.make_node("Mul", ["h", "two"], ["d"]),
             helper.make_node("Cast", ["d"], ["si"], to=TensorProto.INT64),
             helper.make_node("Reshape", ["x", "si"], ["r"]), helper.make_node("Mul", ["r", "scale"], ["m"]),
             helper.make_node("Relu", ["m"], ["y"])]
    for i, node in enumerate(nodes):
        node.name = f"n{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "L"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "L"])], consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def run(data: bytes, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_shape_subgraph_stays_fp32_and_the_data_path_goes_fp16():
    data = shape_arithmetic_model()
    x = np.random.default_rng(0).random((1, 4097), np.float32)
    fp16 = onnx_passes.to_fp16(data, {"x": (1, 4097)})
    np.testing.assert_allclose(run(fp16, x), run(data, x), rtol=1e-2, atol=1e-3)
    model = onnx.load_from_string(fp16)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.value_info}
    data_mul = next(n for n in model.graph.node if n.op_type == "Mul" and "scale" in n.input)
    scale = next(i for i in model.graph.initializer if i.name == "scale")
    assert scale.data_type == TensorProto.FLOAT16  # the data path is fp16
    assert types.get(data_mul.output[0], TensorProto.FLOAT16) == TensorProto.FLOAT16


def test_the_plain_converter_breaks_this_model():
    """Why the fp32 islands exist: converted without them, the size rounds to 4096 and the Reshape fails."""
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = onnx.load_from_string(shape_arithmetic_model())
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 4097
    plain = OnnxModel(model)
    plain.convert_float_to_float16(keep_io_types=True)
    with pytest.raises(Exception, match="4096"):
        run(plain.model.SerializeToString(), np.zeros((1, 4097), np.float32))


def test_shape_nodes_stop_at_shape_and_follow_only_shape_inputs():
    model = onnx.load_from_string(shape_arithmetic_model())
    assert sorted(onnx_passes.shape_nodes(model)) == ["n0", "n1", "n2", "n3", "n4"]  # Shape .. Cast, not x's path
