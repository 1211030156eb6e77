"""ONNX -> Core ML (.mlpackage) export: onnx2torch rebuilds the graph in PyTorch, coremltools converts the traced
module to an ML program (fp16 compute unless the target is fp32).

coremltools has no ONNX frontend since version 6, hence the PyTorch step. Core ML runs only on Apple devices,
so the package is not measured here: it is checked for structure instead (it loads in coremltools, and its
input and output names and shapes are the source's). An op that onnx2torch or coremltools cannot convert
fails the export with a message that names it.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import re
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .types import CompileError

MEDIA = "application/vnd.edgefleet.model.coreml-mlpackage+zip"
MAX_UNZIPPED = 4 << 30  # a package larger than this is not one this compiler wrote
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def missing() -> str | None:
    """Why this host cannot export Core ML, or None."""
    absent = [m for m in ("coremltools", "onnx2torch", "torch") if importlib.util.find_spec(m) is None]
    if absent:
        return (f"the Core ML export needs {', '.join(absent)}; fix: pip install 'edgefleet[coreml]' "
                "(coremltools, onnx2torch and torch)")
    return None


def export(data: bytes, shapes: dict[str, tuple[int, ...]], outputs: list[str], precision: str) -> bytes:
    """The ONNX model ``data`` as a zipped .mlpackage with fixed input ``shapes`` and the source's output names."""
    import coremltools as ct
    import onnx
    import torch
    from onnx2torch import convert

    logging.getLogger("coremltools").setLevel(logging.ERROR)
    try:
        module = convert(onnx.load_from_string(data)).eval()
        example = tuple(torch.zeros(s, dtype=torch.float32) for s in shapes.values())
        with torch.no_grad():
            traced = torch.jit.trace(module, example)
        model = ct.convert(
            traced, inputs=[ct.TensorType(name=k, shape=s) for k, s in shapes.items()],
            outputs=[ct.TensorType(name=n) for n in outputs], convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS16,
            compute_precision=ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16)
    except NotImplementedError as e:  # onnx2torch / coremltools name the op they lack
        raise CompileError("ConversionUnavailable", f"Core ML export: {str(e).splitlines()[0][:300]}",
                           "replace the op in the model, or serve this model on another class") from e
    except Exception as e:
        raise CompileError("ConversionUnavailable",
                           f"Core ML export failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
                           "check the model converts with onnx2torch and coremltools") from e
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "model.mlpackage"
        model.save(str(pkg))
        return _zip(pkg)


def _zip(pkg: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(p for p in pkg.rglob("*") if p.is_file()):
            info = zipfile.ZipInfo(f"model.mlpackage/{f.relative_to(pkg).as_posix()}", _ZIP_TIME)
            info.external_attr = 0o644 << 16
            z.writestr(info, f.read_bytes(), zipfile.ZIP_DEFLATED)
    return buf.getvalue()


def structure(blob: bytes) -> tuple[dict[str, list[int]], list[str]]:
    """(input name -> shape, output names) of a zipped .mlpackage, read by coremltools without running it."""
    import coremltools as ct

    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(io.BytesIO(blob)) as z:
        names = z.namelist()
        if sum(i.file_size for i in z.infolist()) > MAX_UNZIPPED or any(
                n.startswith("/") or ".." in Path(n).parts or not n.startswith("model.mlpackage/") for n in names):
            raise CompileError("InvalidModel", "not a zipped .mlpackage written by this compiler")
        z.extractall(tmp)
        spec = ct.models.MLModel(str(Path(tmp) / "model.mlpackage"), skip_model_load=True).get_spec()
    inputs = {i.name: list(i.type.multiArrayType.shape) for i in spec.description.input}
    return inputs, [o.name for o in spec.description.output]


def coreml_name(name: str) -> str:
    """The name Core ML gives a tensor: characters outside [A-Za-z0-9_] become "_" (sigmoid_0.tmp_0 ->
    sigmoid_0_tmp_0), and a leading digit gets a "_" in front."""
    out = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return f"_{out}" if out[:1].isdigit() else out


def check(blob: bytes, shapes: dict[str, tuple[int, ...]], outputs: list[str]) -> str:
    """Raise unless the package's inputs and outputs are the source's (up to Core ML's renaming); a one-line
    summary naming any renamed output when they are."""
    inputs, outs = structure(blob)
    want = {coreml_name(k): [int(d) for d in np.atleast_1d(s)] for k, s in shapes.items()}
    if inputs != want or outs != [coreml_name(n) for n in outputs]:
        raise CompileError("ConversionUnavailable", f"the .mlpackage has inputs {inputs} and outputs {outs}; the "
                           f"source has {want} and {outputs}", "report the model to coremltools")
    renamed = [f"{n} -> {coreml_name(n)}" for n in [*shapes, *outputs] if coreml_name(n) != n]
    return (f"structure checked: inputs {', '.join(f'{k} {v}' for k, v in inputs.items())}; "
            f"outputs {', '.join(outs)}" + (f" (renamed: {', '.join(renamed)})" if renamed else ""))
