"""What an ONNX model file refers to outside itself, read without the ``onnx`` package (not in the runtime images).

Only the fields that can hold tensors are described (field numbers as in onnx.proto); everything else parses as
unknown fields. ``external_data`` lists every tensor whose data lives in another file: a graph's initializers and
sparse initializers, node attributes (and their subgraphs), and local functions."""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

F = descriptor_pb2.FieldDescriptorProto
_MESSAGES = {  # message -> [(field, number, type, repeated)]; a type starting with "." is a message
    "ModelProto": [("graph", 7, ".onnxscan.GraphProto", False), ("functions", 25, ".onnxscan.FunctionProto", True)],
    "GraphProto": [("node", 1, ".onnxscan.NodeProto", True), ("initializer", 5, ".onnxscan.TensorProto", True),
                   ("sparse_initializer", 15, ".onnxscan.SparseTensorProto", True)],
    "FunctionProto": [("node", 7, ".onnxscan.NodeProto", True)],
    "NodeProto": [("attribute", 5, ".onnxscan.AttributeProto", True), ("op_type", 4, "string", False)],
    "AttributeProto": [("t", 5, ".onnxscan.TensorProto", False), ("g", 6, ".onnxscan.GraphProto", False),
                       ("tensors", 10, ".onnxscan.TensorProto", True), ("graphs", 11, ".onnxscan.GraphProto", True),
                       ("sparse_tensor", 22, ".onnxscan.SparseTensorProto", False),
                       ("sparse_tensors", 23, ".onnxscan.SparseTensorProto", True)],
    "SparseTensorProto": [("values", 1, ".onnxscan.TensorProto", False),
                          ("indices", 2, ".onnxscan.TensorProto", False)],
    "TensorProto": [("name", 8, "string", False), ("external_data", 13, ".onnxscan.StringStringEntryProto", True),
                    ("data_type", 2, "int32", False),
                    ("data_location", 14, "int32", False)],
    "StringStringEntryProto": [("key", 1, "string", False), ("value", 2, "string", False)],
}  # fmt: skip


def _pool() -> descriptor_pool.DescriptorPool:
    fd = descriptor_pb2.FileDescriptorProto(name="edgefleet_onnxscan.proto", package="onnxscan", syntax="proto2")
    for name, fields in _MESSAGES.items():
        msg = fd.message_type.add(name=name)
        for field, number, kind, repeated in fields:
            f = msg.field.add(name=field, number=number)
            f.label = F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL
            if kind.startswith("."):
                f.type, f.type_name = F.TYPE_MESSAGE, kind
            else:
                f.type = F.TYPE_STRING if kind == "string" else F.TYPE_INT32
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return pool


_Model = message_factory.GetMessageClass(_pool().FindMessageTypeByName("onnxscan.ModelProto"))
EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


def external_data(data: bytes) -> list[tuple[str, str]]:
    """``(tensor name, location)`` of every tensor kept outside the model bytes; ValueError if they do not parse."""
    model = _Model.FromString(data)
    found: list[tuple[str, str]] = []
    graphs = [model.graph] if model.HasField("graph") else []
    nodes = [n for f in model.functions for n in f.node]
    while graphs or nodes:
        if graphs:
            g = graphs.pop()
            _tensors(g.initializer, found)
            _tensors([t for s in g.sparse_initializer for t in (s.values, s.indices)], found)
            nodes.extend(g.node)
            continue
        for a in nodes.pop().attribute:
            sparse = (a.sparse_tensor, *a.sparse_tensors)
            _tensors([a.t, *a.tensors, *(t for s in sparse for t in (s.values, s.indices))], found)
            graphs.extend([a.g, *a.graphs])
    return found


def _tensors(tensors, found: list) -> None:
    for t in tensors:
        if t.data_location == EXTERNAL or len(t.external_data):
            location = next((e.value for e in t.external_data if e.key == "location"), "")
            found.append((t.name, location))


FLOAT16 = 10  # TensorProto.DataType.FLOAT16


def precision(data: bytes) -> str:
    """int8 when the graph has QuantizeLinear/DequantizeLinear nodes, fp16 when an initializer is float16, else
    fp32 (the main graph only); ValueError if the bytes do not parse."""
    graph = _Model.FromString(data).graph
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node):
        return "int8"
    return "fp16" if any(t.data_type == FLOAT16 for t in graph.initializer) else "fp32"
