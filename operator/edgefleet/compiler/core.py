"""compile_model: fetch + verify, preflight, build candidates per target, measure, gate, publish, cache."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from . import coreml_export, litert, onnx_passes, shapes, tflite_convert
from .measure import bind, compare, default_threads, latency, load_arrays, open_runner, run_all, synthetic
from .types import (
    QUANTIZATIONS,
    AccuracyBudget,
    Candidate,
    CompileError,
    CompileRequest,
    CompileResult,
    CompileTarget,
    Latency,
    Metrics,
    Policy,
    VariantReport,
    file_sha256,
    sha256_hex,
)

COMPILER_VERSION = "1"
Progress = Callable[[str], None]
CandidateProgress = Callable[[str, int, int, str], None]  # (profile, candidates done, candidates in all, next one)
FASTER_MARGIN = 0.05  # candidates within 5 % of the fastest count as equally fast; the smaller wins
TFLITE_MEDIA = litert.TFLITE_MEDIA
OPENVINO_MEDIA = "application/vnd.edgefleet.model.openvino-ir+zip"
NOT_MEASURED_COREML = "not measured: no Apple device (Core ML runs on macOS/iOS only)"
FP16_TRIES = 4  # fp16 conversions tried per model, each keeping more of the graph fp32
INT8_KEEP_SHARES = (0.0, 1 / 12, 1 / 6)  # dynamic int8 tries: share of MatMul/Gemm kept fp32 (the most outlying)
CANDIDATES = "candidates"  # cache entry folder: the bytes of the candidates inside the budget, by name


def toolchain_versions() -> dict[str, str]:
    out = {"edgefleet-compiler": COMPILER_VERSION}
    for pkg in ("onnx", "onnxruntime", "numpy", "ai-edge-litert", "ai-edge-quantizer", "openvino", "nncf", "onnx2tf",
                "tensorflow", "coremltools", "onnx2torch", "torch"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "absent"


def _has(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


# ----------------------------------------------------------------------------- source
LIMIT_FIX = {
    "size": "publish a smaller model, or raise the operator's EDGEFLEET_SOURCE_MAX_BYTES",
    "deadline": "serve the model from a faster host, or raise the operator's EDGEFLEET_SOURCE_DEADLINE_SECONDS",
    "redirect": "give the URL the file is finally served from, over https, with no redirect to plain http",
}


def source_cache_path(cache_dir: Path, uri: str, digest: str) -> Path:
    """Where the bytes ``uri`` delivered are kept: keyed by the URI and the digest together, so a digest alone
    (another namespace's, say) never finds bytes that this URI did not deliver."""
    from ..artifacts import parse_digest

    return cache_dir / "sources" / f"{sha256_hex(uri.encode())[:32]}-{parse_digest(digest)}"


def fetch_source(request: CompileRequest, cache_dir: Path) -> tuple[bytes, str]:
    """Source bytes and their ``sha256:`` digest, verified against ``request.digest`` when given."""
    src = request.source
    expected = request.digest
    if expected:
        from ..artifacts import DigestError, parse_digest

        try:
            parse_digest(expected)
        except DigestError as e:
            raise CompileError("InvalidRequest", str(e), "give the digest as sha256:<64 lowercase hex>") from e
        cached = source_cache_path(cache_dir, src, expected)
        if "://" in src and cached.exists():
            data = cached.read_bytes()
            if "sha256:" + sha256_hex(data) == expected:
                return data, expected
    data = _read(src, request)
    digest = "sha256:" + sha256_hex(data)
    if expected and digest != expected:
        raise CompileError(
            "DigestMismatch", f"{_shown(src)} has digest {digest}, but {expected} was expected",
            "if this model is the one you want, update the expected digest; otherwise fix the source")
    if "://" in src:
        (cache_dir / "sources").mkdir(parents=True, exist_ok=True)
        source_cache_path(cache_dir, src, digest).write_bytes(data)
    return data, digest


def _shown(src: str) -> str:
    from edgefleet_runtime.bounded import safe_url

    return safe_url(src) if "://" in src and not src.startswith("file://") else src


def _read(src: str, request: CompileRequest) -> bytes:
    """The bytes at ``src``: a URL within the request's size cap and deadline (anonymously: the operator's
    credentials never go to a host a user names), or a local file."""
    from edgefleet_runtime import bounded
    from edgefleet_runtime.fetch import FetchError, FetchLimit, read_source

    if src.startswith("pvc://"):
        raise CompileError("SourceUnavailable", f"{src}: pvc:// sources are read inside the compile Job",
                           "mount the claim and pass the file path, or compile in a Job")
    if src.startswith(("https://", "http://", "oci://")):
        limits = bounded.Limits(max_bytes=request.sourceMaxBytes, deadline_seconds=request.sourceDeadlineSeconds)
        insecure = src.startswith("http://") or os.environ.get("EDGEFLEET_OCI_INSECURE") == "1"
        try:
            return read_source(src, limits, request.digest or "", insecure=insecure)
        except FetchLimit as e:
            raise CompileError("SourceLimitExceeded", f"source {e}", LIMIT_FIX[e.limit]) from e
        except FetchError as e:
            raise CompileError("SourceUnavailable", f"could not read {_shown(src)}: {e}",
                               "check the URL and that it is readable without credentials") from e
        except Exception as e:  # connection refused, TLS, DNS: named, never with a response body
            raise CompileError("SourceUnavailable", f"could not read {_shown(src)} ({type(e).__name__})",
                               "check the URL and network access") from e
    p = Path(src[len("file://"):] if src.startswith("file://") else src)
    if not p.is_file():
        raise CompileError("SourceUnavailable", f"model file {p} does not exist", "check the path")
    return p.read_bytes()


def preflight_onnx(data: bytes, stats: dict | None = None) -> bytes:
    """Validate the source ONNX and return it normalized; raises CompileError with a fix.

    ``stats`` (optional) receives what normalization did (see ``onnx_passes.normalize``)."""
    import onnx

    model = onnx_passes.load(data)
    opset = onnx_passes.default_opset(model)
    max_opset = onnx.defs.onnx_opset_version()
    if opset > max_opset:
        raise CompileError("UnsupportedOpset",
                           f"the model uses ONNX opset {opset}; this toolchain (onnx {onnx.__version__}) and its "
                           f"runtimes support opset <= {max_opset}",
                           f"re-export the model with opset <= {max_opset} (e.g. torch.onnx.export(opset_version=17))")
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type):
            raise CompileError("UnsupportedOperator", f"operator {node.op_type!r} is not an ONNX operator",
                               "re-export with standard ONNX operators")
    for inp in model.graph.input:
        t = inp.type.tensor_type
        if not t.HasField("shape"):
            raise CompileError("InvalidModel", f"input {inp.name!r} has no shape (rank unknown)",
                               "re-export the model with input shapes (dynamic axes are fine)")
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise CompileError("InvalidModel", f"the ONNX checker rejects the model: {str(e).splitlines()[0]}",
                           "re-export the model; check it with onnx.checker.check_model") from e
    norm = onnx_passes.normalize(data, stats)
    try:  # every op must have a kernel: a session with optimizations off loads each one
        onnx_passes.load_unoptimized(norm)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        reason = "UnsupportedOpset" if "opset" in msg.lower() else (
            "UnsupportedOperator" if "implementation" in msg.lower() or "not a registered" in msg.lower()
            else "InvalidModel")
        raise CompileError(reason, f"ONNX Runtime cannot load the model: {msg}",
                           "re-export with operators and an opset that ONNX Runtime supports") from e
    return norm


# ----------------------------------------------------------------------------- planning
@dataclass
class Spec:
    name: str
    format: str
    precision: str
    quantization: str
    runtime: str
    build: str  # key into the builder table


_PREFERENCE = {"int8": ["static-int8", "dynamic-int8", "fp16", "none"], "fp16": ["fp16", "none"],
               "fp32": ["none"]}
_PRECISION = {"none": "fp32", "fp16": "fp16", "dynamic-int8": "int8", "static-int8": "int8"}


def plan(target: CompileTarget, source_format: str, policy: Policy) -> tuple[list[Spec], str | None, str]:
    """Candidates for a target, or ([], reason, message) when the target cannot be served."""
    prec_ok = _PREFERENCE.get(target.precision, ["none"])
    q = policy.quantization
    wanted: list[str] = prec_ok if q == "auto" else [q]
    if q != "auto" and q not in prec_ok:
        return [], "PrecisionNotSupported", (
            f"quantization {q} gives {_PRECISION[q]}, but the profile's target precision is {target.precision}")
    if target.format == "coreml" or target.runtime == "coreml":
        why = coreml_export.missing()
        if why:
            return [], "MissingExtra", why
        if source_format != "onnx":
            return [], "ConversionUnavailable", "the Core ML export takes an ONNX source; give one for this profile"
        if q not in ("auto", "none", "fp16"):
            return [], "PrecisionNotSupported", f"the Core ML export builds fp16 or fp32 ML programs, not {q}"
        fp32 = target.precision == "fp32" or q == "none"
        return [Spec("coreml-fp32" if fp32 else "coreml-fp16", "coreml", "fp32" if fp32 else "fp16",
                     "none" if fp32 else "fp16", "coreml", "coreml-fp32" if fp32 else "coreml-fp16")], None, ""
    if source_format == "onnx":
        if target.format == "tflite" or target.runtime == "litert":
            why = tflite_convert.missing()
            if why:
                return [], "ConversionUnavailable", why + ", or give a .tflite source for this profile"
            qs = tflite_convert.flavours(wanted, target.delegate)
            if not qs:
                built = "static-int8 (a delegate needs full int8)" if target.delegate else "none, dynamic-/static-int8"
                return [], "PrecisionNotSupported", f"ONNX -> .tflite builds {built}, not {', '.join(wanted)}"
            return [Spec(f"litert-{'fp32' if q == 'none' else q}", "tflite", _PRECISION[q], q, "litert",
                         f"onnx2tf-{q}") for q in qs], None, ""
        if target.format == "openvino" or target.runtime == "openvino":
            if not (_has("openvino") and _has("nncf")):
                return [], "MissingExtra", ("the OpenVINO target needs openvino and nncf; "
                                            "fix: pip install 'edgefleet[openvino]'")
            specs = [Spec("openvino-fp32", "openvino", "fp32", "none", "openvino", "ov-fp32")]
            if any(w.endswith("int8") for w in wanted):
                specs.append(Spec("openvino-int8", "openvino", "int8", "static-int8", "openvino", "ov-int8"))
            if q == "none":
                specs = specs[:1]
            elif q != "auto":
                specs = [s for s in specs if s.precision == _PRECISION[q]] or specs[:1]
            return specs, None, ""
        if target.format != "onnx" or target.runtime != "onnxruntime":
            return [], "UnsupportedTarget", f"no ONNX path to format {target.format} / runtime {target.runtime}"
        specs = [Spec(w if w != "none" else "fp32", "onnx", _PRECISION[w], w, "onnxruntime", w) for w in
                 ["none", "fp16", "dynamic-int8", "static-int8"] if w in wanted]
        return specs + _trained_specs(policy, wanted), None, ""
    # tflite source
    if target.format != "tflite" or target.runtime != "litert":
        return [], "ConversionUnavailable", (
            f".tflite -> {target.format} conversion is not supported; give an ONNX source for this profile")
    if target.delegate:
        return [], "ToolchainUnavailable", (
            f"delegate {target.delegate} needs a fully-int8 model compiled by edgetpu_compiler, which this "
            "host lacks; run the compile Job with the Edge TPU image")
    specs = []
    if "none" in wanted or "fp16" in wanted:
        specs.append(Spec("source", "tflite", "as-source", "none", "litert", "tfl-source"))
    if "dynamic-int8" in wanted:
        specs.append(Spec("litert-dynamic-int8", "tflite", "int8", "dynamic-int8", "litert", "tfl-dynamic"))
    if "static-int8" in wanted:
        specs.append(Spec("litert-static-int8", "tflite", "int8", "static-int8", "litert", "tfl-static"))
    return specs, None, ""


TRAINED = ("pruned", "student")  # candidates the compiler trains (compiler/train.py): chosen only when they win


def _trained_specs(policy: Policy, wanted: list[str]) -> list[Spec]:
    """pruned, pruned+int8, student, student+int8 (as asked for by optimization.pruning / .distillation and
    allowed by the quantization): ONNX Runtime targets only."""
    int8 = "static-int8" if "static-int8" in wanted else ("dynamic-int8" if "dynamic-int8" in wanted else None)
    out = []
    for kind, asked in (("pruned", policy.pruning), ("student", policy.distillation)):
        if asked is None:
            continue
        if "none" in wanted:
            out.append(Spec(kind, "onnx", "fp32", "none", "onnxruntime", kind))
        if int8:
            out.append(Spec(f"{kind}+int8", "onnx", "int8", int8, "onnxruntime", f"{kind}+{int8}"))
    return out


def _is_trained(name: str) -> bool:
    return name.split("+")[0] in TRAINED


def measurable(target: CompileTarget) -> tuple[bool, str]:
    if target.delegate and target.format == "tflite":
        return False, (f"{target.delegate} is not on this host: latency measured on CPU; the Edge TPU runs only "
                       "models compiled by edgetpu_compiler, so on the node this variant runs on its CPU")
    if target.runtime == "onnxruntime" and target.execution_provider not in (None, "cpu"):
        return False, f"{target.execution_provider} is not on this host: latency measured on CPU as a stand-in"
    return True, ""


# ----------------------------------------------------------------------------- the compiler
class _Session:
    """State shared by every profile of one compile_model call (built candidates, measurements)."""

    def __init__(self, request: CompileRequest, data: bytes, fmt: str, progress: Progress, tmp: Path):
        self.request, self.policy, self.fmt, self.say, self.tmp = request, request.policy, fmt, progress, tmp
        self.on_candidate: CandidateProgress = lambda profile, done, total, name: None
        self.source = data
        self.request_size = len(data)
        self.built: dict[str, tuple[bytes, str] | CompileError] = {}
        self.trained: dict[str, Any] = {}  # pruned | student -> train.Outcome, or the CompileError it raised
        self.measured: dict[tuple[str, str], Candidate] = {}
        self.checked: dict[str, list[np.ndarray]] = {}  # outputs on the evaluation data by candidate digest
        self.fp16_tries = ""  # what each fp16 try did, when none held
        self.int8_tries = ""  # what each dynamic int8 try did, when none held
        self.work = 0
        self.normalization: dict = {}
        if fmt == "onnx":
            self.say("preflight: ONNX checker, opset, operator kernels, input shapes")
            self.normalized = preflight_onnx(data, self.normalization)
            n = self.normalization
            if n.get("constantsMoved") or n.get("opsetFrom") != n.get("opsetTo"):
                self.say(f"normalize: {n['constantsMoved']} Constant-node weights -> initializers "
                         f"({n['initializers']} initializers), opset {n['opsetFrom']} -> {n['opsetTo']}")
            self.ref_runtime = "onnxruntime"
        else:
            self.say("preflight: LiteRT op listing and load")
            litert.preflight(data)
            self.normalized = data
            self.ref_runtime = "litert"
        ref = open_runner(self.ref_runtime, self.source, default_threads())
        self.output_names = ref.output_names
        pol = self.policy
        self.inputs = self._declared_shapes(ref.inputs, pol.inputShapes)
        # data: validated before anything is built or published
        self.calib_feeds = None
        if pol.calibration:
            feeds, _ = bind(load_arrays(pol.calibration), self.inputs, "calibration")
            self.calib_feeds = feeds
        if pol.evaluation:
            self.eval_feeds, self.labels = bind(load_arrays(pol.evaluation), self.inputs, "evaluation")
            self.synthetic = False
        else:
            self.inputs = shapes.with_data_shapes(self.inputs, self.calib_feeds)
            unknown = shapes.unknown_dims(self.inputs)
            if unknown and pol.quantization == "auto":
                raise shapes.refuse_guessing(unknown)
            self.eval_feeds, self.labels, self.synthetic = synthetic(self.inputs), None, True
        if pol.quantization == "static-int8" and self.calib_feeds is None:
            raise CompileError("InvalidRequest", "quantization static-int8 needs calibration data",
                               "pass --calibration DATA (.npz or a directory of .npy, ~100 samples)")
        if not 0 <= pol.sparsity <= 0.95:
            raise CompileError("InvalidRequest", f"sparsity {pol.sparsity} is outside 0..0.95",
                               "pass a fraction such as 0.3")
        self.ref_out = self._reference(ref)
        self.feed1 = {k: v[:1] for k, v in self.eval_feeds.items()}
        self.budget = pol.accuracyBudget or (AccuracyBudget(max_accuracy_drop=1.0) if self.labels is not None
                                             else AccuracyBudget(min_cosine=0.99))
        self._base: bytes | None = None

    def _declared_shapes(self, inputs: list, explicit: dict[str, list[int]]) -> list:
        """The model's inputs with the dims its metadata or an explicit --input-shape fix (explicit wins)."""
        if self.fmt == "onnx":
            inputs = shapes.apply_shapes(inputs, shapes.onnx_metadata_shapes(self.source),
                                         f"the model's metadata {shapes.METADATA_KEY}")
        inputs = shapes.apply_shapes(inputs, explicit, "--input-shape")
        if explicit:
            self.say("input shapes: " + ", ".join(f"{i.name} {['N' if d is None else d for d in i.shape]}"
                                                  for i in inputs))
        return inputs

    def _reference(self, ref) -> list[np.ndarray]:
        """The source's outputs on the evaluation data; a model that cannot run them is an InvalidData error.

        Synthetic inputs first use 8 for every dynamic dim; models that need larger inputs (a stride-32
        detector such as PP-OCR fails on 8x8) are retried at 64 and 224 before giving up."""
        dynamic = any(d is None for i in self.inputs for d in i.shape[1:])
        sizes = (8, 64, 224) if self.synthetic and dynamic else (None,)
        errors = []
        for size in sizes:
            if size is not None and size != 8:
                self.eval_feeds = synthetic(self.inputs, dynamic_size=size)
            n = len(next(iter(self.eval_feeds.values())))
            shapes = ", ".join(f"{k} {list(v.shape[1:])}" for k, v in self.eval_feeds.items())
            self.say(f"reference: source model in {self.ref_runtime} on {n} "
                     f"{'synthetic ' if self.synthetic else ''}evaluation samples ({shapes})")
            try:
                return run_all(ref, self.eval_feeds)
            except Exception as e:
                msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
                errors.append(f"{shapes}: {msg}")
        if self.synthetic:
            raise CompileError(
                "InvalidData", "the source model does not run on synthetic inputs (dynamic dims tried as "
                f"{', '.join(map(str, sizes))}): " + "; ".join(errors),
                "pass --evaluation DATA with inputs in a shape the model takes")
        raise CompileError("InvalidData", f"the source model fails on the evaluation data ({errors[0]})",
                           "give evaluation data in a shape the model takes (e.g. an image size it supports)")

    # -- building
    def calib_batches(self, size: int = 1) -> list[dict[str, np.ndarray]]:
        feeds = self.calib_feeds
        if feeds is None:
            raise CompileError("NoCalibrationData", "this candidate needs calibration data", "pass --calibration")
        n = len(next(iter(feeds.values())))
        return [{k: v[i : i + size] for k, v in feeds.items()} for i in range(0, n, size)]

    def base(self) -> bytes:
        if self._base is None:
            self.say("pass: ONNX Runtime graph optimization (fp32 baseline)")
            b = onnx_passes.optimize(self.normalized)
            if self.policy.sparsity > 0:
                self.say(f"pass: magnitude pruning to {self.policy.sparsity:.0%} sparsity")
                b = onnx_passes.prune(b, self.policy.sparsity)
            self._base = b
        return self._base

    def build(self, spec: Spec) -> tuple[bytes, str]:
        if spec.build in self.built:
            r = self.built[spec.build]
            if isinstance(r, CompileError):
                raise r
            return r
        try:
            r = self._build(spec)
        except CompileError as e:
            self.built[spec.build] = e
            raise
        except Exception as e:
            err = CompileError("PassFailed", f"{spec.name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            self.built[spec.build] = err
            raise err from e
        self.built[spec.build] = r
        return r

    def _build(self, spec: Spec) -> tuple[bytes, str]:
        b = spec.build
        self.say(f"build: {spec.name}")
        if _is_trained(b):
            return self._build_trained(b), onnx_passes.ONNX_MEDIA
        if b.startswith("onnx2tf-"):
            src = onnx_passes.prune(self.normalized, self.policy.sparsity) if self.policy.sparsity else self.normalized
            return tflite_convert.build(src, b.removeprefix("onnx2tf-"), self.calib_feeds, self.tmp / "onnx2tf",
                                        self.say, {k: v.shape for k, v in self.feed1.items()}), TFLITE_MEDIA
        if b == "tfl-source":
            return self.source, TFLITE_MEDIA
        if b == "tfl-dynamic":
            out = litert.quantize(self.source, "dynamic_wi8_afp32")
            if len(out) > 0.9 * len(self.source):
                raise CompileError("NothingQuantized", (
                    f"ai-edge-quantizer quantized no weights ({len(self.source)} -> {len(out)} bytes): the float "
                    f"weights are stored {litert.weights_precision(self.source)} behind DEQUANTIZE ops"),
                    "give a float32 .tflite export to quantize")
            return out, TFLITE_MEDIA
        if b == "tfl-static":
            if self.calib_feeds is None:
                raise CompileError("NoCalibrationData", "static int8 needs calibration data")
            if not litert.has_signatures(self.source):
                raise CompileError("NeedsSignatures", "ai-edge-quantizer's static recipes need a model with "
                                   "signatures; this .tflite has none")
            return litert.quantize(self.source, "static_wi8_ai8", self.calib_batches()), TFLITE_MEDIA
        if b in ("coreml-fp16", "coreml-fp32"):
            pinned = {k: tuple(v.shape) for k, v in self.feed1.items()}
            return coreml_export.export(self.normalized, pinned, self.output_names,
                                        b.removeprefix("coreml-")), coreml_export.MEDIA
        if b in ("ov-fp32", "ov-int8"):
            from . import openvino_passes

            calib = self.calib_batches() if self.calib_feeds is not None else None
            if b == "ov-int8" and calib is None:
                raise CompileError("NoCalibrationData", "NNCF int8 needs calibration data")
            return openvino_passes.build(self.base(), calib if b == "ov-int8" else None), OPENVINO_MEDIA
        base = self.base()
        if b == "none":
            out = base
        elif b == "fp16":
            out = self.fp16(base)
        elif b == "dynamic-int8":
            out = self.dynamic_int8(base)
        elif b == "static-int8":
            if self.calib_feeds is None:
                raise CompileError("NoCalibrationData", "static int8 needs calibration data (--calibration)")
            out = onnx_passes.static_int8(base, self.calib_batches())
        else:  # pragma: no cover
            raise CompileError("PassFailed", f"unknown pass {b}")
        if self.policy.sparsity > 0:
            return onnx_passes.compress(out), onnx_passes.GZIP_MEDIA
        return out, onnx_passes.ONNX_MEDIA

    def train(self, kind: str):
        """The pruned model or the student (train.Outcome), trained once per compile; CompileError if it failed."""
        if kind not in self.trained:
            try:
                self.trained[kind] = self._train(kind)
            except CompileError as e:
                self.trained[kind] = e
            except Exception as e:  # a model the training cannot take: named, the other candidates go on
                self.trained[kind] = CompileError("TrainingFailed", f"{kind}: {type(e).__name__}: "
                                                  f"{str(e).splitlines()[0][:300] if str(e) else ''}")
        out = self.trained[kind]
        if isinstance(out, CompileError):
            raise out
        return out

    def _train(self, kind: str):
        from . import train

        if self.calib_feeds is None:
            field = "pruning" if kind == "pruned" else "distillation"
            raise CompileError("NoCalibrationData", f"optimization.{field} trains on the calibration inputs",
                               "add optimization.calibration (--calibration)")
        if len(self.calib_feeds) != 1:
            raise CompileError("PruningUnsupported" if kind == "pruned" else "DistillationUnsupported",
                               f"the model has {len(self.calib_feeds)} inputs; training takes one",
                               f"remove optimization.{'pruning' if kind == 'pruned' else 'distillation'}")
        (name, x), = self.calib_feeds.items()
        runner = open_runner(self.ref_runtime, self.source, default_threads())

        def run_source(batch: np.ndarray) -> np.ndarray:
            return run_all(runner, {name: batch})[0]

        p, d = self.policy.pruning, self.policy.distillation
        if kind == "pruned" and p is not None:
            return train.prune(self.normalized, run_source, x, p.ratio, p.epochs, p.seed, p.deadline_seconds, self.say)
        if d is None:  # pragma: no cover - plan() adds student candidates only with a distillation
            raise CompileError("InvalidRequest", f"no optimization for candidate {kind}")
        return train.distill(self.normalized, run_source, x, d.student, d.epochs, d.temperature, d.seed,
                             d.deadline_seconds, self.say)

    def _build_trained(self, build: str) -> bytes:
        kind, _, quant = build.partition("+")
        fp32 = onnx_passes.optimize(self.train(kind).onnx)
        if quant == "static-int8":
            return onnx_passes.static_int8(fp32, self.calib_batches())
        if quant == "dynamic-int8":
            return onnx_passes.dynamic_int8(fp32)
        return fp32

    def fp16(self, base: bytes) -> bytes:
        """fp16 that holds, decided by running it: each try runs on the evaluation data and is gated on the budget;
        a try that fails keeps more of the graph fp32 (precision-sensitive ops, then the nodes its errors name).
        When tries run but none is within budget, the last one is returned (it loses on the budget, and its reason
        lists every try: ``fp16_tries``); when none runs, the error lists what each one did."""
        pinned = {k: v.shape for k, v in self.feed1.items()}
        tries: list[str] = []
        ops: tuple[str, ...] = ()
        nodes: list[str] = []
        ran: bytes | None = None
        for attempt in range(FP16_TRIES):
            out = onnx_passes.to_fp16(base, pinned, keep_ops=ops, keep_nodes=nodes)
            kept = f"fp32 kept for shape arithmetic{' + ' + ', '.join(ops) if ops else ''}" + (
                f" + nodes {', '.join(nodes)}" if nodes else "")
            try:
                got = run_all(open_runner("onnxruntime", out, default_threads()), self.eval_feeds)
            except Exception as e:
                msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
                tries.append(f"try {attempt + 1} ({kept}): does not run: {msg}")
                named = onnx_passes.node_named_in(msg)
                if named and named not in nodes and named in onnx_passes.node_names(base):
                    nodes.append(named)
                elif ops != onnx_passes.FP16_SENSITIVE_OPS:
                    ops = onnx_passes.FP16_SENSITIVE_OPS
                else:
                    break
                continue
            self.checked["sha256:" + sha256_hex(out)] = got
            ok, failure = self.gate(compare(self.ref_out, got, self.labels, self.synthetic))
            if ok:
                if attempt:
                    self.say(f"fp16: holds on try {attempt + 1} ({kept}); before: " + "; ".join(tries))
                return out
            tries.append(f"try {attempt + 1} ({kept}): off budget: {failure}")
            ran = out
            if ops == onnx_passes.FP16_SENSITIVE_OPS:
                break
            ops = onnx_passes.FP16_SENSITIVE_OPS
        self.fp16_tries = "; ".join(tries)
        if ran is not None:
            self.say(f"fp16: no try within the accuracy budget: {self.fp16_tries}")
            return ran
        raise CompileError("Fp16DoesNotHold", "no fp16 conversion runs: " + self.fp16_tries,
                           "serve the fp32 variant on this class, or report the failing op to the converter "
                           "(onnxruntime.transformers float16)")

    def dynamic_int8(self, base: bytes) -> bytes:
        """Dynamic int8 that holds, decided by running it: try 1 quantizes every weight; a try off budget keeps
        fp32 the MatMul/Gemm nodes whose input activations are most heavy-tailed (onnx_passes.activation_outliers,
        on the calibration data: 1/12 of them, then 1/6). Returns the first try within budget, else the last one
        (it loses on the budget; ``int8_tries`` says what each try did)."""
        tries: list[str] = []
        ranked: list[tuple[str, float]] | None = None
        out = base
        for attempt, share in enumerate(INT8_KEEP_SHARES):
            keep: list[str] = []
            if share:
                if ranked is None:
                    ranked = onnx_passes.activation_outliers(base, self.calib_feeds or self.eval_feeds)
                keep = [n for n, _ in ranked[:max(1, math.ceil(len(ranked) * share))]]
                if not keep:
                    break  # no MatMul/Gemm to keep fp32: another try would build the same model
            out = onnx_passes.dynamic_int8(base, keep)
            got = run_all(open_runner("onnxruntime", out, default_threads()), self.eval_feeds)
            self.checked["sha256:" + sha256_hex(out)] = got
            ok, failure = self.gate(compare(self.ref_out, got, self.labels, self.synthetic))
            kept = f"fp32 kept for {len(keep)} MatMul/Gemm with outlier inputs" if keep else "every weight int8"
            if ok:
                if attempt:
                    self.say(f"dynamic-int8: holds on try {attempt + 1} ({kept}: {', '.join(keep)}); before: "
                             + "; ".join(tries))
                return out
            tries.append(f"try {attempt + 1} ({kept}): off budget: {failure}")
        self.int8_tries = "; ".join(tries)
        self.say(f"dynamic-int8: no try within the accuracy budget: {self.int8_tries}")
        return out

    # -- measuring
    def candidate(self, spec: Spec) -> Candidate:
        key = (spec.build, spec.runtime)
        if key in self.measured:
            return replace(self.measured[key], latency=replace(self.measured[key].latency),
                           metrics=replace(self.measured[key].metrics))
        name = _name_of(self, spec)
        c = Candidate(name=name, format=spec.format, precision=spec.precision, quantization=spec.quantization,
                      runtime=spec.runtime)
        try:
            data, media = self.build(spec)
            self.work += 1
            if spec.precision == "as-source":
                c.precision = litert.weights_precision(data)
            c.sha256, c.sizeBytes, c.mediaType = "sha256:" + sha256_hex(data), len(data), media
            if spec.runtime == "coreml":  # no Apple device here: a structural check instead of a measurement
                c.why = coreml_export.check(data, {k: tuple(v.shape) for k, v in self.feed1.items()},
                                            self.output_names)
                c.latency.measuredOn = NOT_MEASURED_COREML
                self.say(f"check: {c.name} ({c.sizeBytes} bytes): {c.why}")
                self.measured[key] = c
                return replace(c, latency=replace(c.latency), metrics=replace(c.metrics))
            self.say(f"measure: {c.name} ({c.sizeBytes} bytes) in {spec.runtime}")
            out = self.checked.get(c.sha256) or run_all(open_runner(spec.runtime, data, default_threads()),
                                                        self.eval_feeds)
            c.metrics = compare(self.ref_out, out, self.labels, self.synthetic)
            threads = self.policy.threads or default_threads()
            c.latency = latency(spec.runtime, data, self.feed1, self.policy.timingRuns, threads)
            c.latency.measuredOn = f"{spec.runtime} CPU on this host"
            if name in self.policy.hostLatencyMs:  # test hook: the host reports this p50 instead
                c.latency.p50Ms1 = self.policy.hostLatencyMs[name]
                c.latency.measuredOn += " (p50 set by hostLatencyMs)"
            c.withinBudget, c.budgetFailure = self.gate(c.metrics)
            if spec.build == "fp16" and not c.withinBudget and self.fp16_tries:
                c.budgetFailure = f"{c.budgetFailure} (fp16 tries: {self.fp16_tries})"
            if spec.build == "dynamic-int8" and not c.withinBudget and self.int8_tries:
                c.budgetFailure = f"{c.budgetFailure} (dynamic-int8 tries: {self.int8_tries})"
        except CompileError as e:
            c.state, c.reason, c.why = "Failed", e.reason, e.message + (f" Fix: {e.fix}" if e.fix else "")
        except Exception as e:
            c.state, c.reason = "Failed", "RunFailed"
            c.why = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        self.measured[key] = c
        return replace(c, latency=replace(c.latency), metrics=replace(c.metrics))

    def gate(self, m: Metrics) -> tuple[bool, str | None]:
        b = self.budget
        if m.cosine is not None and not math.isfinite(m.cosine):
            return False, "cosine vs source is not a number: outputs hold inf or NaN (an overflow)"
        if b.max_accuracy_drop is not None and m.accuracy is not None:
            drop = ((m.referenceAccuracy or 0.0) - m.accuracy) * 100
            if drop > b.max_accuracy_drop + 1e-9:
                return False, (f"accuracy dropped {drop:.2f} points ({m.referenceAccuracy:.4f} -> {m.accuracy:.4f})"
                               f" > maxAccuracyDrop {b.max_accuracy_drop}")
        elif b.max_accuracy_drop is not None and b.min_cosine is None and m.cosine is not None and m.cosine < 0.99:
            return False, f"no labels to measure accuracy; cosine {m.cosine:.4f} < 0.99"
        if b.min_cosine is not None and m.cosine is not None and m.cosine < b.min_cosine:
            return False, f"cosine vs source {m.cosine:.4f} < minCosine {b.min_cosine}"
        return True, None


OVER_SIZE = "OverSizeBudget"


def _size_budget(c: Candidate, limit: int | None) -> Candidate:
    """A candidate larger than the hardware's maxModelSizeBytes cannot be chosen: Failed, saying by how much."""
    if limit and c.state != "Failed" and c.sizeBytes is not None and c.sizeBytes > limit:
        c.state, c.reason = "Failed", OVER_SIZE
        c.why = f"{c.sizeBytes} bytes > spec.budget.maxModelSizeBytes {limit}"
    return c


def _p50(c: Candidate) -> float:
    """p50 at 1 thread; a candidate that was not measured counts as the slowest."""
    return c.latency.p50Ms1 if c.latency.p50Ms1 is not None else math.inf


def _select(cands: list[Candidate], target: CompileTarget, on_target: bool) -> Candidate | None:
    ok = [c for c in cands if c.state != "Failed" and (c.withinBudget or c.latency.measuredOn == NOT_MEASURED_COREML)]
    if not ok:
        return None
    if on_target:
        fastest = min(_p50(c) for c in ok)
        near = [c for c in ok if _p50(c) <= fastest * (1 + FASTER_MARGIN)]
        return min(near, key=lambda c: (_is_trained(c.name), c.sizeBytes or 0, _p50(c)))
    order = _PREFERENCE.get(target.precision, ["none"])
    return min(ok, key=lambda c: (order.index(c.quantization) if c.quantization in order else 99,
                                  _is_trained(c.name), c.sizeBytes or 0))


def _explain(cands: list[Candidate], chosen: Candidate | None, on_target: bool) -> None:
    for c in cands:
        if c is chosen:
            c.state = "Chosen"
            continue
        if c.state == "Failed":
            continue
        c.state = "Lost"
        if not c.withinBudget:
            c.why = f"outside the accuracy budget: {c.budgetFailure}"
            if chosen is not None and on_target and _p50(c) > _p50(chosen) * (1 + FASTER_MARGIN):
                c.why += (f"; also slower: p50 {_p50(c):.3f} ms vs {_p50(chosen):.3f} ms "
                          f"({_p50(c) / _p50(chosen):.2f}x)")
        elif chosen is None:
            c.why = "not chosen"
        elif not on_target:
            c.why = f"the target precision prefers {chosen.name}"
        elif _p50(c) > _p50(chosen) * (1 + FASTER_MARGIN):
            c.why = (f"slower: p50 {_p50(c):.3f} ms vs {_p50(chosen):.3f} ms "
                     f"({_p50(c) / _p50(chosen):.2f}x)")
        elif _is_trained(c.name) and not _is_trained(chosen.name):
            c.why = (f"not faster than {chosen.name} by more than {FASTER_MARGIN:.0%} (p50 {_p50(c):.3f} vs "
                     f"{_p50(chosen):.3f} ms): a trained candidate is chosen only when it wins on latency or "
                     "nothing else fits the size budget")
        else:
            c.why = f"as fast but larger: {c.sizeBytes} vs {chosen.sizeBytes} bytes"


def _cache_key(src_digest: str, request: CompileRequest, target: CompileTarget, versions: dict[str, str],
               data_digests: dict[str, str | None]) -> str:
    pol = asdict(request.policy)
    budget = request.policy.accuracyBudget  # the wire form older cache keys were made from
    pol["accuracyBudget"] = {"maxAccuracyDrop": budget.max_accuracy_drop if budget else None,
                             "minCosine": budget.min_cosine if budget else None}
    pol["calibration"] = data_digests.get("calibration")
    pol["evaluation"] = data_digests.get("evaluation")
    for key in ("pruning", "distillation"):  # only when set: the keys of untrained compiles stay as they were
        asked = getattr(request.policy, key)
        if asked is None:
            pol.pop(key)
        else:
            pol[key] = asked.to_dict()
            versions = {**versions, "torch": _version("torch")}
    blob = json.dumps({"source": src_digest, "policy": pol, "target": target.to_dict(), "toolchain": versions},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _data_digest(p: Path | None) -> str | None:
    if p is None:
        return None
    p = Path(p)
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(p.glob("*.npy")):
            h.update(f.name.encode() + file_sha256(f).encode())
        return h.hexdigest()
    return file_sha256(p) if p.exists() else f"missing:{p}"


def _annotations(v: VariantReport) -> dict[str, str]:
    m = v.metrics or Metrics()
    lat = v.latency or Latency()
    ann = {
        "org.opencontainers.image.title": f"{v.profile}.{v.format}",
        "io.edgefleet.profile": v.profile, "io.edgefleet.format": str(v.format),
        "io.edgefleet.precision": str(v.precision), "io.edgefleet.quantization": str(v.quantization),
        "io.edgefleet.candidate": str(v.chosen), "io.edgefleet.sizeBytes": str(v.sizeBytes),
        "io.edgefleet.latencyP50Ms": str(lat.p50Ms1), "io.edgefleet.latencyP95Ms": str(lat.p95Ms1),
        "io.edgefleet.loadSeconds": str(lat.loadSeconds), "io.edgefleet.accuracyDelta": str(m.accuracyDelta),
        "io.edgefleet.cosine": str(m.cosine), "io.edgefleet.target": json.dumps(v.target.to_dict(), sort_keys=True),
    }
    return {k: v for k, v in ann.items() if v != "None"}


def compile_model(request: CompileRequest, store=None, cache_dir: Path | str | None = None,
                  progress: Progress | None = None, signing_key_file: str | os.PathLike | None = None,
                  encryption_key=None, candidates: CandidateProgress | None = None) -> CompileResult:
    """Compile ``request.source`` for every target; see the package docstring for the contract.

    ``signing_key_file``: every published variant is signed with this ECDSA P-256 key (edgefleet_runtime.trust);
    ``encryption_key``: every published variant is encrypted (AES-256-GCM) for this P-256 public key or under
    this 32-byte key (edgefleet_runtime.trust.load_encryption_key); ``candidates`` hears of each profile's
    candidates as they are built and measured (a progress display)."""
    say: Progress = progress or (lambda _m: None)
    signing_key = _signing_key(signing_key_file)
    cache = Path(cache_dir) if cache_dir else Path(os.environ.get("EDGEFLEET_CACHE", "~/.cache/edgefleet/compile"))
    cache = cache.expanduser()
    (cache / "variants").mkdir(parents=True, exist_ok=True)
    if request.policy.quantization not in QUANTIZATIONS:
        raise CompileError("InvalidRequest", f"unknown quantization {request.policy.quantization!r}",
                           "use auto, none, fp16, dynamic-int8 or static-int8")
    if not request.targets:
        raise CompileError("InvalidRequest", "no target profiles", "pass at least one --profile")
    versions = toolchain_versions()
    say(f"source: {request.source}")
    data, digest = fetch_source(request, cache)
    fmt = "tflite" if litert.is_tflite(data) else "onnx"
    data_digests = {"calibration": _data_digest(request.policy.calibration),
                    "evaluation": _data_digest(request.policy.evaluation)}
    name = request.name or Path(request.source.split("@")[0].rstrip("/")).stem or "model"
    result = CompileResult(source=request.source, sourceDigest=digest, sourceFormat=fmt, sourceSizeBytes=len(data),
                           variants={}, toolchain=versions)
    todo: dict[str, tuple[CompileTarget, str]] = {}
    for profile, target in sorted(request.targets.items()):
        key = _cache_key(digest, request, target, versions, data_digests)
        entry = cache / "variants" / key
        if (entry / "report.json").exists():
            v = VariantReport.from_dict(json.loads((entry / "report.json").read_text()))
            v.profile, v.cacheHit = profile, True
            say(f"{profile}: cache hit ({key[:12]})")
            result.variants[profile] = v
        else:
            todo[profile] = (target, key)
    session = None
    if todo:
        with tempfile.TemporaryDirectory(prefix="edgefleet-compile-") as tmp:
            session = _Session(request, data, fmt, say, Path(tmp))
            session.on_candidate = candidates or session.on_candidate
            for profile, (target, key) in todo.items():
                say(f"{profile}: target {target.to_dict()}")
                result.variants[profile] = _compile_one(session, profile, target, key, len(data), cache)
    # publish (Ready variants only; the bytes come from the cache entry)
    for profile, v in sorted(result.variants.items()):
        if v.state != "Ready":
            continue
        entry = cache / "variants" / v.cacheKey
        blob, trust_annotations = _protect(entry, v, signing_key, encryption_key)
        if trust_annotations:
            say(f"{profile}: {', '.join(sorted(trust_annotations))} ({v.digest})")
        if store is not None:
            ref = store.put(blob, name=f"{name}-{profile}", media_type=v.mediaType or "application/octet-stream",
                            annotations={**_annotations(v), **trust_annotations}, filename=f"model.{_ext(v)}")
            v.artifact = ref.ref
            say(f"{profile}: published {ref.ref}")
        else:
            v.artifact = _local_copy(entry, blob, trust_annotations).as_uri()
        if encryption_key is None:  # encrypted models are chosen on the host: the benchmark cannot open them
            _publish_candidates(v, entry, store, name, signing_key, say)
    result.workDone = session.work if session else 0
    result.cacheHit = not todo
    return result


def _publish_candidates(v: VariantReport, entry: Path, store, name: str, signing_key, say: Progress) -> None:
    """Every candidate inside the accuracy budget, content-addressed like the chosen one, so a benchmark Job
    can measure them on a node of the class (``candidate.artifact``). A cache entry of an older compiler that
    kept only the chosen variant publishes only that one."""
    for c in v.candidates:
        if c.state == "Chosen":
            c.artifact = v.artifact
            continue
        kept = entry / CANDIDATES / c.name
        if c.state == "Failed" or not c.withinBudget or not kept.is_file():
            continue
        blob = kept.read_bytes()
        ann = _signature(entry, "sha256:" + sha256_hex(blob), signing_key)
        if store is None:
            path = _local_copy(entry, blob, ann, kept)
            c.artifact = path.as_uri()
            continue
        annotations = {**_annotations(v), "io.edgefleet.candidate": c.name, "io.edgefleet.format": c.format,
                       "io.edgefleet.precision": c.precision, "io.edgefleet.quantization": c.quantization,
                       "io.edgefleet.latencyP50Ms": str(c.latency.p50Ms1), **ann}
        ext = _ext(replace(v, format=c.format, mediaType=c.mediaType))
        c.artifact = store.put(blob, name=f"{name}-{v.profile}", media_type=c.mediaType or "application/octet-stream",
                               annotations=annotations, filename=f"model.{ext}").ref
        say(f"{v.profile}: published candidate {c.name} {c.artifact}")


def _signing_key(path: str | os.PathLike | None):
    if path is None:
        return None
    from edgefleet_runtime.trust import TrustError, load_signing_key

    try:
        return load_signing_key(path)
    except TrustError as e:
        raise CompileError("InvalidSigningKey", str(e), "mount the signing key Secret (an ECDSA P-256 PEM) "
                           "at EDGEFLEET_SIGNING_KEY_FILE / --signing-key-file") from e


def encryption_key_from_pem(pem: str):
    """The P-256 public key of EdgeModel.spec.encryption.publicKey; CompileError naming the field otherwise."""
    from edgefleet_runtime.trust import TrustError, public_key_from_pem

    try:
        return public_key_from_pem(pem.encode(), "spec.encryption.publicKey")
    except TrustError as e:
        raise CompileError("InvalidEncryptionKey", str(e), "paste PREFIX.pub of `edgefleet keygen encryption PREFIX`"
                           ) from e


def _protect(entry: Path, v: VariantReport, signing_key, encryption_key) -> tuple[bytes, dict]:
    """The bytes to publish and their trust annotations; ``v.digest``/``sizeBytes`` become those of these bytes.

    The ciphertext and the signature are kept in the cache entry per key, so a recompile publishes the same
    digest (no rollout) while a new key encrypts or signs again (rotation)."""
    from edgefleet_runtime import trust

    blob = (entry / "artifact").read_bytes()
    ann: dict[str, str] = {}
    if encryption_key is not None:
        kek_id = trust.encryption_key_id(encryption_key)
        kept = entry / f"encrypted-{kek_id.split(':')[1]}"
        if not kept.exists():
            _write_atomic(kept, trust.encrypt(blob, encryption_key))
        blob = kept.read_bytes()
        ann.update({"io.edgefleet.encryption": "A256GCM", "io.edgefleet.encryptionKeyId": kek_id})
    v.digest, v.sizeBytes = "sha256:" + sha256_hex(blob), len(blob)
    return blob, {**ann, **_signature(entry, v.digest, signing_key)}


def _signature(entry: Path, digest: str, signing_key) -> dict[str, str]:
    """The signature annotation of ``digest`` (kept in the cache entry per key and digest); {} unsigned."""
    if signing_key is None:
        return {}
    from edgefleet_runtime import trust

    key_hex = trust.key_id(signing_key.public_key()).split(":")[1]
    kept = entry / f"signature-{key_hex}-{digest.split(':')[1][:16]}"
    if not kept.exists():
        _write_atomic(kept, trust.sign_digest(signing_key, digest).encode())
    return {trust.SIGNATURE_ANNOTATION: kept.read_text().strip()}


def _local_copy(entry: Path, blob: bytes, ann: dict[str, str], path: Path | None = None) -> Path:
    """Without a store the cache entry is the artifact (``path``, default the chosen variant): its plaintext,
    or the protected copy beside it."""
    from edgefleet_runtime.trust import SIGNATURE_ANNOTATION, signature_path

    path = path or entry / "artifact"
    if ann.get("io.edgefleet.encryption"):
        path = entry / f"encrypted-{ann['io.edgefleet.encryptionKeyId'].split(':')[1]}"
    if SIGNATURE_ANNOTATION in ann:
        _write_atomic(Path(signature_path(path)), ann[SIGNATURE_ANNOTATION].encode())
    return path


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _ext(v: VariantReport) -> str:
    return {"onnx": "onnx.gz" if (v.mediaType or "").endswith("gzip") else "onnx", "tflite": "tflite",
            "openvino": "ovzip", "coreml": "mlpackage.zip"}.get(v.format or "", "bin")


def _compile_one(s: _Session, profile: str, target: CompileTarget, key: str, src_size: int,
                 cache: Path) -> VariantReport:
    v = VariantReport(profile=profile, target=target, state="Failed", cacheKey=key, sourceSizeBytes=src_size)
    specs, reason, message = plan(target, s.fmt, s.policy)
    if reason:
        v.reason, v.message = reason, message
        s.say(f"{profile}: Failed {reason}: {message}")
        _store_failure(cache, key, v)
        return v
    on_target, note = measurable(target)
    cands = []
    for i, sp in enumerate(specs):
        s.on_candidate(profile, i, len(specs), _name_of(s, sp))
        cands.append(_size_budget(s.candidate(sp), target.max_model_size_bytes))
    s.on_candidate(profile, len(specs), len(specs), "")
    chosen = _select(cands, target, on_target)
    _explain(cands, chosen, on_target)
    v.candidates = cands
    v.training = _training_summary(s, cands) or None
    if chosen is None:
        failed = [c for c in cands if c.state == "Failed"]
        if any(c.reason == OVER_SIZE for c in failed) and len(failed) == len(cands):
            v.reason = "ModelSizeBudgetExceeded"
            v.message = ("no candidate fits the HardwareProfile's spec.budget.maxModelSizeBytes: "
                         + "; ".join(f"{c.name}: {c.why}" for c in cands)
                         + ". Fix: raise spec.budget.maxModelSizeBytes, allow int8 (quantization auto), or prune "
                         "(optimization.pruning, optimization.sparsity) or distill (optimization.distillation)")
        elif len(failed) == len(cands):
            v.reason = failed[0].reason or "PassFailed"
            v.message = "; ".join(f"{c.name}: {c.why}" for c in cands)
        else:
            v.reason = "AccuracyBudgetExceeded"
            v.message = "no candidate is inside the accuracy budget: " + "; ".join(
                f"{c.name}: {c.budgetFailure or c.why}" for c in cands)
        v.message += _training_line(v.training)
        s.say(f"{profile}: Failed {v.reason}: {v.message}")
        if v.reason not in ("RunFailed", "PassFailed"):  # deterministic outcomes only
            _store_failure(cache, key, v)
        return v
    v.state, v.chosen = "Ready", chosen.name
    v.format, v.precision, v.quantization = chosen.format, chosen.precision, chosen.quantization
    v.digest, v.sizeBytes, v.mediaType = chosen.sha256, chosen.sizeBytes, chosen.mediaType
    v.latency, v.metrics, v.loadSeconds = chosen.latency, chosen.metrics, chosen.latency.loadSeconds
    m = chosen.metrics
    if chosen.latency.measuredOn == NOT_MEASURED_COREML:
        v.message = f"{chosen.name}: converted; {NOT_MEASURED_COREML}; {chosen.why}"
    else:
        quality = (f"accuracy {m.accuracy:.4f} ({m.accuracyDelta:+.2f} points)" if m.accuracy is not None
                   else f"cosine {m.cosine:.4f}")
        v.message = (f"{chosen.name}: {src_size / (chosen.sizeBytes or src_size):.2f}x smaller than the source, "
                     f"p50 {_p50(chosen):.3f} ms @1 thread, {quality}" + (f"; {note}" if note else "")
                     + _training_line(v.training))
    # cache entry: artifact + report, written atomically (rename of a complete directory)
    entry = cache / "variants" / key
    tmp = cache / "variants" / f".tmp-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    by_name = {_name_of(s, sp): sp for sp in specs}
    data, _ = s.build(by_name[chosen.name])
    (tmp / "artifact").write_bytes(data)
    (tmp / CANDIDATES).mkdir()
    for c in cands:  # the other candidates inside the budget: published too, for on-target selection
        if c is not chosen and c.state != "Failed" and c.withinBudget:
            (tmp / CANDIDATES / c.name).write_bytes(s.build(by_name[c.name])[0])
    (tmp / "report.json").write_text(json.dumps(v.to_dict(), indent=2, sort_keys=True, default=str))
    if entry.exists():
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, entry)
    s.say(f"{profile}: Ready {v.message}")
    return v


def _training_summary(s: _Session, cands: list[Candidate]) -> dict[str, dict[str, Any]]:
    """Each trained model against the teacher (the source, as the fp32 candidate measured it)."""
    by_name = {c.name: c for c in cands}
    teacher = by_name.get(_name_of(s, Spec("fp32", "onnx", "fp32", "none", "onnxruntime", "none")))
    out: dict[str, dict[str, Any]] = {}
    for kind, outcome in sorted(s.trained.items()):
        if not any(n.split("+")[0] == kind for n in by_name):
            continue  # this profile has no candidate of it (e.g. a .tflite target)
        if isinstance(outcome, CompileError):
            out[kind] = {"reason": outcome.reason, "message": outcome.message + (f" Fix: {outcome.fix}"
                                                                                if outcome.fix else "")}
            continue
        mine = by_name.get(kind) or by_name.get(next((n for n in by_name if n.startswith(kind + "+")), ""))
        row: dict[str, Any] = {"detail": outcome.detail, "epochs": outcome.epochs, "loss": round(outcome.loss, 6),
                               "seconds": outcome.seconds, "transferSamples": outcome.transferSamples,
                               "teacherSizeBytes": s.request_size, "candidate": mine.name if mine else None}
        if mine is not None and mine.sizeBytes is not None:
            row.update(sizeBytes=mine.sizeBytes, p50Ms=mine.latency.p50Ms1, agreement=mine.metrics.agreement,
                       accuracyDelta=mine.metrics.accuracyDelta)
        if teacher is not None and teacher.latency.p50Ms1 is not None:
            row.update(teacherSizeBytes=teacher.sizeBytes, teacherP50Ms=teacher.latency.p50Ms1)
        out[kind] = row
    return out


def _training_line(training: dict[str, dict[str, Any]] | None) -> str:
    """'; student (mlp:[64]) vs teacher: 23.2x smaller, p50 0.012 vs 0.130 ms, agreement 0.958' per trained model."""
    parts = []
    for kind, t in sorted((training or {}).items()):
        if "reason" in t:
            parts.append(f"{kind} failed: {t['reason']}: {t['message']}")
        elif t.get("sizeBytes") and t.get("teacherSizeBytes"):
            p50 = (f", p50 {t['p50Ms']:.3f} vs {t['teacherP50Ms']:.3f} ms"
                   if t.get("p50Ms") is not None and t.get("teacherP50Ms") is not None else "")
            agree = f", agreement {t['agreement']:.3f}" if t.get("agreement") is not None else ""
            parts.append(f"{t['candidate']} ({t['detail']}) vs teacher: "
                         f"{t['teacherSizeBytes'] / t['sizeBytes']:.1f}x smaller{p50}{agree}")
    return "".join(f"; {p}" for p in parts)


def _store_failure(cache: Path, key: str, v: VariantReport) -> None:
    entry = cache / "variants" / key
    entry.mkdir(parents=True, exist_ok=True)
    tmp = entry / f".report-{os.getpid()}"
    tmp.write_text(json.dumps(v.to_dict(), indent=2, sort_keys=True, default=str))
    os.replace(tmp, entry / "report.json")


def _name_of(s: _Session, spec: Spec) -> str:
    if s.policy.sparsity and s.fmt == "onnx" and not _is_trained(spec.build):
        return f"pruned{int(s.policy.sparsity * 100)}-{spec.name}"
    return spec.name
