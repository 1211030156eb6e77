"""Structured pruning and knowledge distillation: the compiler's trained candidates (PyTorch on the CPU).

PyTorch comes with the ``train`` extra and is imported only here, only when a pruned or distilled candidate is
asked for: the operator and runtime images never load it.

- ``prune``: the source must be a chain (each node feeds the next) of Conv, Gemm/MatMul(+Add), BatchNormalization,
  pooling, Flatten and element-wise activations. Every Conv or inner fully connected layer loses its filters
  (hidden units) of smallest L1 norm, down to ``1 - ratio`` of them, with the matching input channels of the
  next layer; the smaller chain is fine-tuned against the source's own outputs; the ONNX graph is kept and
  only its weights are replaced, so inputs, outputs and operators are the source's.
- ``distill``: a student MLP (``mlp:[64]``) is trained on the teacher's soft outputs (KL divergence at a
  temperature) and written as a new ONNX graph with the teacher's input and output names.

Both train on a transfer set: the calibration inputs plus mixes of pairs of them (mixup), labelled by the
source model. Deterministic: one thread, a seed for every random choice, deterministic kernels.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .types import CompileError

Say = Callable[[str], None]
ACTIVATIONS = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "HardSigmoid", "Softplus", "Identity", "Dropout"}
POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"}
CHANNEL_KEEPING = ACTIVATIONS | POOLS | {"BatchNormalization", "Flatten"}  # channel c stays channel (block) c
TRANSFER_MAX_BYTES = 256 << 20  # the transfer set (inputs + teacher outputs) in memory
TRANSFER_MIN_SAMPLES = 2048  # calibration inputs are mixed until the transfer set has this many
BATCH = 64


@dataclass
class Outcome:
    """A trained model and how the training went (for the compile report)."""

    onnx: bytes
    epochs: int
    loss: float  # mean loss of the last epoch
    seconds: float
    transferSamples: int
    detail: str  # e.g. "32->16, 64->32, 128->64 filters" or "mlp:[64]"


def missing() -> str | None:
    """Why the trained candidates cannot be built here, or None."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return f"pruned and distilled candidates need PyTorch, which this compiler lacks; fix: {_fix()}"
    return None


def _fix() -> str:
    """In a compile Job the operator says which setting brings PyTorch (EDGEFLEET_TRAIN_FIX); elsewhere: pip."""
    return os.environ.get("EDGEFLEET_TRAIN_FIX", "")[:400] or "pip install 'edgefleet[train]'"


def _torch():
    why = missing()
    if why:
        raise CompileError("MissingExtra", why.split("; fix: ")[0], _fix())
    import torch

    return torch


@contextlib.contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """One thread, deterministic kernels, seeded: the same inputs give the same bytes. Restores the settings."""
    torch = _torch()
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)


# ----------------------------------------------------------------------------- transfer set
def transfer_inputs(x: np.ndarray, seed: int, min_samples: int = TRANSFER_MIN_SAMPLES) -> np.ndarray:
    """The calibration inputs plus mixes of random pairs of them (mixup, weight uniform in 0..1), up to
    ``min_samples`` in all and at most TRANSFER_MAX_BYTES."""
    x = np.asarray(x, dtype=np.float32)
    per = max(1, x[0].nbytes * 2)
    n = max(len(x), min(min_samples, TRANSFER_MAX_BYTES // per))
    if n <= len(x):
        return x[: max(1, TRANSFER_MAX_BYTES // per)]
    rng = np.random.default_rng(seed)
    extra = n - len(x)
    i, j = rng.integers(0, len(x), extra), rng.integers(0, len(x), extra)
    lam = rng.uniform(0, 1, (extra,) + (1,) * (x.ndim - 1)).astype(np.float32)
    return np.concatenate([x, lam * x[i] + (1 - lam) * x[j]]).astype(np.float32)


def as_logits(y: np.ndarray) -> tuple[np.ndarray, bool]:
    """Teacher outputs as logits, and whether they were probabilities (rows in 0..1 summing to 1)."""
    y = np.asarray(y, dtype=np.float32)
    probs = bool(y.min() >= 0 and y.max() <= 1 and np.allclose(y.sum(1), 1, atol=1e-3))
    return (np.log(np.clip(y, 1e-8, 1)) if probs else y), probs


def fit(model, params, x: np.ndarray, teacher_logits: np.ndarray, epochs: int, temperature: float, lr: float,
        seed: int, deadline_seconds: float, say: Say, what: str) -> float:
    """Train ``model`` (x -> logits) on the teacher's soft targets; the last epoch's mean loss.

    Raises CompileError TrainingDeadlineExceeded past ``deadline_seconds``."""
    torch = _torch()
    f = torch.nn.functional
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(teacher_logits))
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    gen = torch.Generator().manual_seed(seed)
    start, loss_mean, t = time.monotonic(), math.nan, temperature
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for k in range(0, len(xt), BATCH):
            if time.monotonic() - start > deadline_seconds:
                raise CompileError("TrainingDeadlineExceeded",
                                   f"{what}: training passed its deadline of {deadline_seconds:g} s in epoch "
                                   f"{epoch}/{epochs}",
                                   f"raise optimization.{what}.deadlineSeconds or lower optimization.{what}.epochs")
            idx = order[k : k + BATCH]
            out = model(xt[idx])
            target = f.softmax(yt[idx] / t, dim=1)
            loss = f.kl_div(f.log_softmax(out / t, dim=1), target, reduction="batchmean") * t * t
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        sched.step()
        loss_mean = total / len(xt)
        say(f"{what}: epoch {epoch}/{epochs} loss {loss_mean:.5f}")
    return loss_mean


# ----------------------------------------------------------------------------- the source as a chain
class Chain:
    """A chain-shaped ONNX graph with its weights as torch tensors, runnable (and trainable) in torch."""

    def __init__(self, data: bytes):
        import onnx
        from onnx import numpy_helper

        self.model = onnx.load_from_string(data)
        g = self.model.graph
        self.weights = {t.name: numpy_helper.to_array(t).copy() for t in g.initializer}
        inputs = [i for i in g.input if i.name not in self.weights]
        if len(inputs) != 1 or len(g.output) != 1:
            raise _unsupported(f"the model has {len(inputs)} inputs and {len(g.output)} outputs; pruning takes "
                               "one input and one output")
        used: dict[str, int] = {}
        current = inputs[0].name
        self.nodes = list(g.node)
        for node in self.nodes:
            data_in = [i for i in node.input if i and i not in self.weights]
            if node.op_type not in CHANNEL_KEEPING | {"Conv", "Gemm", "MatMul", "Add", "Softmax"}:
                raise _unsupported(f"operator {node.op_type} ({node.name or node.output[0]}) is not one pruning "
                                   "handles (Conv, Gemm, MatMul, Add, BatchNormalization, pooling, Flatten, "
                                   "activations, Softmax)")
            if data_in != [current] or node.input[0] != current:
                raise _unsupported(f"node {node.name or node.output[0]} ({node.op_type}) does not take the "
                                   "previous node's output alone: the graph is not a chain")
            for w in node.input[1:]:
                used[w] = used.get(w, 0) + 1
            current = node.output[0]
        if current != g.output[0].name:
            raise _unsupported("the chain does not end in the model's output")
        shared = [w for w, n in used.items() if n > 1]
        if shared:
            raise _unsupported(f"weights {shared} are shared by several nodes")
        self.input_name = inputs[0].name
        torch = _torch()
        frozen = {n for node in self.nodes if node.op_type == "BatchNormalization" for n in node.input[3:5]}
        self.params = {k: torch.nn.Parameter(torch.from_numpy(v.astype(np.float32)))
                       for k, v in self.weights.items() if v.dtype == np.float32 and k not in frozen}

    def attrs(self, node) -> dict:
        from onnx import helper

        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def forward(self, x, logits: bool = True, shapes: list | None = None):
        """Run the chain; ``logits`` stops before a final Softmax; ``shapes`` receives each node's output shape."""
        torch = _torch()
        f = torch.nn.functional
        for k, node in enumerate(self.nodes):
            op, a, w = node.op_type, self.attrs(node), [self._w(n) for n in node.input[1:]]
            if op == "Softmax" and logits and k == len(self.nodes) - 1:
                break
            x = _op(torch, f, op, a, x, w)
            if shapes is not None:
                shapes.append(tuple(x.shape))
        return x

    def _w(self, name: str):
        torch = _torch()
        if not name:
            return None
        return self.params.get(name, None) if name in self.params else torch.from_numpy(self.weights[name])

    def to_onnx(self) -> bytes:
        """The source graph with the (pruned, trained) weights; shapes re-inferred."""
        import onnx
        from onnx import numpy_helper

        m = onnx.ModelProto()
        m.CopyFrom(self.model)
        del m.graph.value_info[:]
        for t in m.graph.initializer:
            arr = self.params[t.name].detach().numpy() if t.name in self.params else self.weights[t.name]
            t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr.astype(self.weights[t.name].dtype)), t.name))
        m = onnx.shape_inference.infer_shapes(m)
        onnx.checker.check_model(m)
        return m.SerializeToString()


def _unsupported(msg: str) -> CompileError:
    return CompileError("PruningUnsupported", msg,
                        "remove optimization.pruning for this model (quantized candidates are still built), "
                        "or use optimization.distillation")


def _op(torch, f, op: str, a: dict, x, w: list):
    if op == "Conv":
        pads = list(a.get("pads", [0, 0, 0, 0]))
        n = len(pads) // 2
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or pads[:n] != pads[n:] or a.get("group", 1) != 1:
            raise _unsupported("Conv with auto_pad, asymmetric pads or groups is not handled")
        if x.dim() != 4:
            raise _unsupported("only 2-D convolutions are handled")
        return f.conv2d(x, w[0], w[1] if len(w) > 1 else None, stride=tuple(a.get("strides", [1, 1])),
                        padding=tuple(pads[:n]), dilation=tuple(a.get("dilations", [1, 1])))
    if op == "Gemm":
        if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
            raise _unsupported("Gemm with transA, alpha or beta is not handled")
        y = x @ (w[0].T if a.get("transB", 0) else w[0])
        return y + w[1] if len(w) > 1 and w[1] is not None else y
    if op == "MatMul":
        return x @ w[0]
    if op == "Add":
        return x + w[0]
    if op == "BatchNormalization":
        scale, bias, mean, var = w[:4]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        eps = a.get("epsilon", 1e-5)
        return (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + eps) * scale.reshape(shape) + \
            bias.reshape(shape)
    if op == "Flatten":
        axis = a.get("axis", 1)
        if axis != 1:
            raise _unsupported("Flatten with axis other than 1 is not handled")
        return torch.flatten(x, 1)
    if op in ("MaxPool", "AveragePool"):
        pads = list(a.get("pads", [0, 0, 0, 0]))
        if a.get("ceil_mode", 0) or pads[:2] != pads[2:] or (op == "AveragePool" and any(pads)) or \
                a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise _unsupported(f"{op} with ceil_mode, auto_pad or uneven pads is not handled")
        k, s = tuple(a["kernel_shape"]), tuple(a.get("strides", [1, 1]))
        if op == "MaxPool":
            return f.max_pool2d(x, k, s, tuple(pads[:2]), dilation=tuple(a.get("dilations", [1, 1])))
        return f.avg_pool2d(x, k, s)
    if op == "GlobalAveragePool":
        return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)
    if op == "GlobalMaxPool":
        return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)
    if op == "Softmax":
        return f.softmax(x, dim=a.get("axis", -1))
    if op in ("Identity", "Dropout"):
        return x
    acts = {"Relu": f.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Softplus": f.softplus}
    if op in acts:
        return acts[op](x)
    if op == "LeakyRelu":
        return f.leaky_relu(x, a.get("alpha", 0.01))
    if op == "Elu":
        return f.elu(x, a.get("alpha", 1.0))
    if op == "HardSigmoid":
        return torch.clamp(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0, 1)
    raise _unsupported(f"operator {op} is not handled")  # pragma: no cover - Chain refuses it first


# ----------------------------------------------------------------------------- structured pruning
@dataclass
class _Layer:
    index: int  # node index
    weight: str
    out_axis: int  # axis of the weight that indexes output channels
    in_axis: int  # axis of the weight that indexes input channels


def _linear(chain: Chain, k: int) -> _Layer | None:
    node = chain.nodes[k]
    if node.op_type == "Conv":
        return _Layer(k, node.input[1], 0, 1)
    if node.op_type == "Gemm":
        t = chain.attrs(node).get("transB", 0)
        return _Layer(k, node.input[1], 0 if t else 1, 1 if t else 0)
    if node.op_type == "MatMul":
        return _Layer(k, node.input[1], 1, 0)
    return None


def _per_channel(chain: Chain, start: int, stop: int) -> list[str]:
    """Weights between two linear layers that follow the channels (BatchNormalization, a MatMul's bias Add)."""
    out = []
    for node in chain.nodes[start + 1 : stop]:
        if node.op_type == "BatchNormalization":
            out += list(node.input[1:5])
        elif node.op_type == "Add":
            out.append(node.input[1])
    node = chain.nodes[start]
    if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2]:
        out.append(node.input[2])
    return out


def prune_chain(chain: Chain, ratio: float, sample: np.ndarray) -> str:
    """Remove ``ratio`` of the output channels of every linear layer that feeds another one; what was done."""
    torch = _torch()
    shapes: list = []
    with torch.no_grad():
        chain.forward(torch.from_numpy(sample[:1]), logits=False, shapes=shapes)
    layers = [layer for k in range(len(chain.nodes)) if (layer := _linear(chain, k))]
    done = []
    for prod, cons in zip(layers, layers[1:], strict=False):
        between = [n.op_type for n in chain.nodes[prod.index + 1 : cons.index]]
        if any(op not in CHANNEL_KEEPING | {"Add"} for op in between):
            continue
        w = chain.params[prod.weight].detach().numpy()
        n = w.shape[prod.out_axis]
        keep_n = max(1, int(round(n * (1 - ratio))))
        if keep_n >= n:
            continue
        norms = np.abs(np.moveaxis(w, prod.out_axis, 0)).reshape(n, -1).sum(1)
        keep = np.sort(np.argsort(-norms, kind="stable")[:keep_n])
        block = _block(chain, shapes, prod.index, cons.index, n)
        cons_keep = (keep[:, None] * block + np.arange(block)[None, :]).reshape(-1)
        _slice(chain, prod.weight, prod.out_axis, keep)
        for name in _per_channel(chain, prod.index, cons.index):
            _slice(chain, name, -1 if chain.weights[name].ndim == 1 else 0, keep)
        _slice(chain, cons.weight, cons.in_axis, cons_keep)
        done.append(f"{n}->{keep_n}")
    if not done:
        raise _unsupported("no layer feeds another through channel-keeping operators; nothing to prune")
    return ", ".join(done)


def _block(chain: Chain, shapes: list, prod: int, cons: int, channels: int) -> int:
    """How many consecutive inputs of the consumer one producer channel becomes (H*W after a Flatten)."""
    if not any(n.op_type == "Flatten" for n in chain.nodes[prod + 1 : cons]):
        return 1
    flat = shapes[[k for k in range(prod + 1, cons) if chain.nodes[k].op_type == "Flatten"][0]]
    if flat[1] % channels:
        raise _unsupported(f"Flatten of {flat[1]} values does not split into {channels} channels")
    return flat[1] // channels


def _slice(chain: Chain, name: str, axis: int, keep: np.ndarray) -> None:
    torch = _torch()
    arr = chain.params[name].detach().numpy() if name in chain.params else chain.weights[name]
    new = np.ascontiguousarray(np.take(arr, keep, axis=axis))
    chain.weights[name] = new
    if name in chain.params:
        chain.params[name] = torch.nn.Parameter(torch.from_numpy(new.astype(np.float32)))


def prune(source: bytes, run_source: Callable[[np.ndarray], np.ndarray], calibration: np.ndarray, ratio: float,
          epochs: int, seed: int, deadline_seconds: float, say: Say) -> Outcome:
    """The source with ``ratio`` of its filters removed and fine-tuned on its own outputs (logits)."""
    torch = _torch()
    start = time.monotonic()
    with _deterministic(seed):
        chain = Chain(source)
        x = transfer_inputs(calibration, seed)
        with torch.no_grad():
            mirror = chain.forward(torch.from_numpy(x[:64]), logits=False).numpy()
            teacher = chain.forward(torch.from_numpy(x)).numpy()
        ref = np.asarray(run_source(x[:64]), dtype=np.float32)
        if ref.shape != mirror.shape or not np.allclose(mirror, ref, rtol=1e-3, atol=1e-3):
            diff = float(np.abs(mirror - ref).max()) if ref.shape == mirror.shape else math.inf
            raise _unsupported(f"the PyTorch copy of the model disagrees with ONNX Runtime (max difference {diff:g})")
        detail = prune_chain(chain, ratio, x)
        say(f"pruning: filters {detail} (ratio {ratio}); fine-tune {epochs} epochs on {len(x)} transfer samples")
        loss = math.nan
        if epochs:
            loss = fit(chain.forward, list(chain.params.values()), x, teacher, epochs, 2.0, 1e-3, seed,
                       deadline_seconds, say, "pruning")
        data = chain.to_onnx()
    return Outcome(data, epochs, loss, round(time.monotonic() - start, 2), len(x), f"filters {detail}")


# ----------------------------------------------------------------------------- distillation
def parse_student(spec: str) -> list[int]:
    """Hidden widths of ``mlp:[64,32]``; CompileError naming the field otherwise."""
    m = re.fullmatch(r"mlp:\[(\d+(?:,\d+)*)\]", spec)
    if not m:
        raise CompileError("InvalidRequest", f"optimization.distillation.student {spec!r} is not an architecture "
                           "edgefleet builds", "use mlp:[H] or mlp:[H1,H2], e.g. mlp:[64]")
    return [int(h) for h in m.group(1).split(",")]


def distill(teacher: bytes, run_teacher: Callable[[np.ndarray], np.ndarray], calibration: np.ndarray,
            student: str, epochs: int, temperature: float, seed: int, deadline_seconds: float, say: Say) -> Outcome:
    """A student MLP trained on the teacher's soft outputs, as ONNX with the teacher's input and output."""
    torch = _torch()
    hidden = parse_student(student)
    io = teacher_io(teacher)
    start = time.monotonic()
    with _deterministic(seed):
        x = transfer_inputs(calibration, seed)
        y = np.asarray(run_teacher(x), dtype=np.float32)
        if y.ndim != 2 or y.shape[1] < 2 or len(y) != len(x):
            raise CompileError("DistillationUnsupported",
                               f"the teacher's output {io['output']!r} has shape {list(y.shape)}; a student learns "
                               "class scores [N, classes]", "remove optimization.distillation for this model")
        logits, probs = as_logits(y)
        sizes = [int(np.prod(x.shape[1:]))] + hidden + [y.shape[1]]
        layers: list = []
        for a, b in zip(sizes, sizes[1:], strict=False):
            layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
        net = torch.nn.Sequential(torch.nn.Flatten(), *layers[:-1])
        say(f"distill: student {student} ({sum(p.numel() for p in net.parameters())} parameters), {epochs} epochs "
            f"on {len(x)} transfer samples, temperature {temperature}")
        net.train()
        loss = fit(net, list(net.parameters()), x, logits, epochs, temperature, 3e-3, seed, deadline_seconds, say,
                   "distillation")
        weights = [(m.weight.detach().numpy(), m.bias.detach().numpy()) for m in net if isinstance(m, torch.nn.Linear)]
    data = mlp_onnx(weights, io, probs)
    return Outcome(data, epochs, loss, round(time.monotonic() - start, 2), len(x), student)


def teacher_io(teacher: bytes) -> dict:
    """The teacher's one float input and one output (names, input type, opset); CompileError otherwise."""
    import onnx

    m = onnx.load_from_string(teacher)
    init = {t.name for t in m.graph.initializer}
    inputs = [i for i in m.graph.input if i.name not in init]
    if len(inputs) != 1 or len(m.graph.output) != 1:
        raise CompileError("DistillationUnsupported",
                           f"the teacher has {len(inputs)} inputs and {len(m.graph.output)} outputs; a student "
                           "mirrors one input and one output", "remove optimization.distillation for this model")
    if inputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise CompileError("DistillationUnsupported", f"the teacher's input {inputs[0].name!r} is not float32",
                           "remove optimization.distillation for this model")
    opset = max([o.version for o in m.opset_import if o.domain in ("", "ai.onnx")] or [13])
    return {"input": inputs[0], "output": m.graph.output[0].name, "opset": max(opset, 13), "ir": m.ir_version}


def mlp_onnx(weights: list[tuple[np.ndarray, np.ndarray]], io: dict, softmax: bool) -> bytes:
    """Flatten -> (Gemm -> Relu)* -> Gemm [-> Softmax], named as the teacher's input and output."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Flatten", [io["input"].name], ["flat"], axis=1)]
    inits, prev = [], "flat"
    for k, (w, b) in enumerate(weights):
        last = k == len(weights) - 1
        out = (io["output"] if not softmax else "logits_") if last else f"h{k}"
        inits += [numpy_helper.from_array(w.astype(np.float32), f"w{k}"),
                  numpy_helper.from_array(b.astype(np.float32), f"b{k}")]
        nodes.append(helper.make_node("Gemm", [prev, f"w{k}", f"b{k}"], [out], transB=1))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"r{k}"]))
            out = f"r{k}"
        prev = out
    if softmax:
        nodes.append(helper.make_node("Softmax", [prev], [io["output"]], axis=1))
    output = helper.make_tensor_value_info(io["output"], TensorProto.FLOAT, ["N", int(weights[-1][0].shape[0])])
    graph = helper.make_graph(nodes, "student", [io["input"]], [output], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", io["opset"])],
                              producer_name="edgefleet-distill")
    model.ir_version = io["ir"]
    onnx.checker.check_model(model)
    return model.SerializeToString()
