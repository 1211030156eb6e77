"""Fine-tune the last dense layer of an ONNX classifier with numpy, the rest of the graph frozen.

What it can train: a model whose (single) output is produced by a final dense layer, either
``Gemm(features, W, b)`` (alpha = beta = 1, transA = 0, W and b initializers) or ``MatMul(features, W)``
followed by ``Add(_, b)`` (W and b initializers), with 2-D features [N, F] and logits [N, C]. The body
(everything before that layer) runs unchanged in ONNX Runtime to give the features; the head is softmax
regression trained with cross-entropy and SGD (optionally with FedProx's proximal term). Anything else
(a Softmax after the head, convolutional or attention outputs, several outputs) is refused with
`UnsupportedModel` naming the reason.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper


class UnsupportedModel(ValueError):
    """The model's shape is not one this trainer can fine-tune; the message says why."""


@dataclass
class HeadLayout:
    """Where the head's weights live in the graph: tensor names and whether W is stored [C, F]."""

    features: str
    weight: str
    bias: str
    transposed: bool  # Gemm transB=1: W stored as [C, F]


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def find_head(model: onnx.ModelProto) -> tuple[HeadLayout, list[onnx.NodeProto]]:
    """The trainable head of `model` and its nodes; UnsupportedModel when the model has no such head."""
    g = model.graph
    if len(g.output) != 1:
        raise UnsupportedModel(f"the model has {len(g.output)} outputs; the trainer needs exactly one (the logits)")
    inits = {t.name for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    out = g.output[0].name
    last = producer.get(out)
    if last is None:
        raise UnsupportedModel(f"output {out!r} is not produced by a node")
    if last.op_type == "Gemm":
        if _attr(last, "transA", 0) or _attr(last, "alpha", 1.0) != 1.0 or _attr(last, "beta", 1.0) != 1.0:
            raise UnsupportedModel("the final Gemm uses transA, alpha or beta; the trainer needs a plain x·W + b")
        if len(last.input) != 3 or last.input[1] not in inits or last.input[2] not in inits:
            raise UnsupportedModel("the final Gemm's weight and bias must both be initializers (constants)")
        return HeadLayout(last.input[0], last.input[1], last.input[2], bool(_attr(last, "transB", 0))), [last]
    if last.op_type == "Add":
        mm = producer.get(last.input[0])
        bias = last.input[1]
        if mm is None or mm.op_type != "MatMul":
            mm, bias = producer.get(last.input[1]), last.input[0]
        if mm is not None and mm.op_type == "MatMul" and mm.input[1] in inits and bias in inits:
            return HeadLayout(mm.input[0], mm.input[1], bias, False), [mm, last]
    raise UnsupportedModel(
        f"output {out!r} comes from a {last.op_type} node; the trainer trains only a final dense layer "
        "(Gemm, or MatMul + Add, with constant weights) that produces the model's only output (logits)")


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@dataclass
class Head:
    """The trainable layer as numpy arrays: logits = features @ w + b, w [F, C], b [C]."""

    w: np.ndarray
    b: np.ndarray

    def parameters(self) -> list[np.ndarray]:
        return [self.w, self.b]

    @classmethod
    def of(cls, params: list[np.ndarray]) -> Head:
        w, b = params
        return cls(np.asarray(w, np.float32), np.asarray(b, np.float32))

    def logits(self, x: np.ndarray) -> np.ndarray:
        return x @ self.w + self.b


class HeadModel:
    """An ONNX classifier split into a frozen body (run by ONNX Runtime) and a numpy head."""

    def __init__(self, model_bytes: bytes):
        self.model = onnx.load_from_string(model_bytes)
        self.layout, head_nodes = find_head(self.model)
        weights = _weights(self.model)
        w, b = weights[self.layout.weight], weights[self.layout.bias]
        if w.ndim != 2:
            raise UnsupportedModel(f"the head's weight {self.layout.weight!r} is {w.ndim}-D; it must be 2-D")
        w = w.T if self.layout.transposed else w
        if b.size != w.shape[1]:
            raise UnsupportedModel(f"the head's bias has {b.size} values for {w.shape[1]} classes; it must be [C]")
        self.head = Head(w.astype(np.float32).copy(), b.reshape(-1).astype(np.float32).copy())
        self.input_names = [i.name for i in self.model.graph.input if i.name not in weights]
        self._body = self._body_session(head_nodes)

    def _body_session(self, head_nodes):
        import onnxruntime as ort

        body = copy.deepcopy(self.model)
        drop = {id(n) for n in head_nodes}
        keep = [n for n in self.model.graph.node if id(n) not in drop]
        del body.graph.node[:]
        body.graph.node.extend(copy.deepcopy(keep))
        del body.graph.output[:]
        body.graph.output.append(onnx.helper.make_tensor_value_info(self.layout.features, onnx.TensorProto.FLOAT, None))
        used = {i for n in keep for i in n.input}
        kept = [t for t in body.graph.initializer if t.name in used]
        del body.graph.initializer[:]
        body.graph.initializer.extend(kept)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        return ort.InferenceSession(body.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    def features(self, inputs: dict[str, np.ndarray], batch: int = 256) -> np.ndarray:
        """The body's output (the head's input) for `inputs` (model input name -> array), [N, F] float32."""
        n = len(next(iter(inputs.values())))
        parts = []
        for s in range(0, n, batch):
            out = self._body.run(None, {k: v[s:s + batch] for k, v in inputs.items()})[0]
            if out.ndim != 2:
                raise UnsupportedModel(f"the head's input {self.layout.features!r} is {out.ndim}-D; it must be [N, F]")
            parts.append(out.astype(np.float32))
        return np.concatenate(parts) if parts else np.zeros((0, self.head.w.shape[0]), np.float32)

    def with_head(self, head: Head) -> bytes:
        """The full model with `head`'s weights in place of the original head's (same graph, same names)."""
        model = copy.deepcopy(self.model)
        w = head.w.T if self.layout.transposed else head.w
        for t in model.graph.initializer:
            if t.name == self.layout.weight:
                t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w, np.float32), t.name))
            elif t.name == self.layout.bias:
                old = numpy_helper.to_array(t)
                t.CopyFrom(numpy_helper.from_array(head.b.reshape(old.shape).astype(np.float32), t.name))
        return model.SerializeToString()


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def loss_and_accuracy(head: Head, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy of `head` on features `x`, labels `y`."""
    if len(y) == 0:
        return 0.0, 0.0
    p = _softmax(head.logits(x))
    loss = float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())
    return loss, float((p.argmax(1) == y).mean())


def gradients(head: Head, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """d(mean cross-entropy)/d(w, b) for a batch."""
    p = _softmax(head.logits(x))
    p[np.arange(len(y)), y] -= 1.0
    p /= len(y)
    return x.T @ p, p.sum(axis=0)


def train(head: Head, x: np.ndarray, y: np.ndarray, *, epochs: int = 5, learning_rate: float = 0.5,
          batch_size: int = 32, proximal_mu: float = 0.0, seed: int = 0) -> Head:
    """SGD on the head; with proximal_mu > 0 the FedProx term mu/2 * ||theta - theta_start||^2 is added.

    `learning_rate` is relative to the features' scale: the gradient step is 4 * learning_rate / mean(||x||^2 + 1)
    (softmax regression's curvature is at most ||x||^2 / 2, so values in (0, 1) are stable whatever the scale
    of the body's features; the digits CNN's have ||x||^2 of about 3,000). The proximal term pulls by
    learning_rate * proximal_mu * (theta - theta_start) a step, in the same relative units."""
    if len(y) == 0:
        raise ValueError("no training samples")
    classes = head.w.shape[1]
    if y.min() < 0 or y.max() >= classes:
        raise ValueError(f"labels must be in [0, {classes}); got {int(y.min())}..{int(y.max())}")
    start = Head(head.w.copy(), head.b.copy())
    w, b = head.w.copy(), head.b.copy()
    step = 4.0 * learning_rate / float(np.mean(np.sum(x.astype(np.float64) ** 2, axis=1)) + 1.0)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            gw, gb = gradients(Head(w, b), x[idx], y[idx])
            pull = learning_rate * proximal_mu
            w -= (step * gw + pull * (w - start.w)).astype(np.float32)
            b -= (step * gb + pull * (b - start.b)).astype(np.float32)
    return Head(w, b)

