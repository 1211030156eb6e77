"""OpenVINO IR (fp32) and NNCF post-training int8 (extra ``[openvino]``); preflight with query_model.

The artifact is one file: a zip (fixed timestamps, so the digest is stable) of ``model.xml`` + ``model.bin``.
"""

from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .types import CompileError


def _require():
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError as e:
        raise CompileError("MissingExtra", "the OpenVINO target needs openvino and nncf",
                           "pip install 'edgefleet[openvino]'") from e


def build(onnx_bytes: bytes, calib: list[dict[str, np.ndarray]] | None) -> bytes:
    _require()
    import openvino as ov

    core = ov.Core()
    model = core.read_model(onnx_bytes)
    supported = core.query_model(model, "CPU")
    missing = [op.get_friendly_name() for op in model.get_ops() if op.get_friendly_name() not in supported]
    if missing:
        raise CompileError("UnsupportedOperator", f"OpenVINO CPU cannot run {missing[:5]}",
                           "re-export the model with operators OpenVINO supports")
    if calib is not None:
        import logging

        import nncf

        logging.getLogger("nncf").setLevel(logging.ERROR)
        model = nncf.quantize(model, nncf.Dataset(calib), subset_size=len(calib))
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "model.xml"
        ov.save_model(model, str(xml), compress_to_fp16=False)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
            for name in ("model.xml", "model.bin"):
                info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                z.writestr(info, (Path(tmp) / name).read_bytes())
        return buf.getvalue()
