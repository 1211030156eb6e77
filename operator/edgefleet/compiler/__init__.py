"""edgefleet.compiler: one model in, an optimized and measured variant per hardware class out.

One entry point, used by ``edgefleet compile``, by the operator in-process and inside a compile Job::

    compile_model(request: CompileRequest, store: ArtifactStore | None = None,
                  cache_dir: Path | str | None = None,          # default $EDGEFLEET_CACHE or ~/.cache/edgefleet/compile
                  progress: Callable[[str], None] | None = None) -> CompileResult
    load_profiles(path: str | PathLike | None = None) -> dict[str, CompileTarget]   # None = built-in

    CompileRequest(source: str,                      # path | file:// | https:// | oci://host:port/repo(:tag|@sha256:..)
                   targets: dict[str, CompileTarget],  # profile name -> its spec.target (+ budget size limit)
                   policy: Policy = Policy(),
                   digest: str | None = None,        # expected "sha256:<hex>" of the source bytes
                   name: str | None = None)          # artifact name prefix (default: source file stem)
    CompileTarget(format="onnx", precision="fp32", runtime="onnxruntime", execution_provider=None, delegate=None,
                  max_model_size_bytes=None)    # the API's Target (same validation) + spec.budget.maxModelSizeBytes
    CompileTarget.of_profile(hardware_profile_spec)  # a HardwareProfileSpec or its wire form
    Policy(quantization="auto",                      # auto | none | fp16 | dynamic-int8 | static-int8
           sparsity=0.0,                             # magnitude pruning fraction 0..0.95 (artifact gzip-compressed)
           calibration: Path | None, evaluation: Path | None,   # .npz (keys = input names, labels "y") or .npy dir
           accuracyBudget: AccuracyBudget | None = None,   # the API's; None: the default below
           timingRuns=50, threads=None,              # latency runs; N for the N-thread figure (default cpu count)
           pruning: Pruning | None, distillation: Distillation | None)  # the API's; trained candidates pruned,
                                                     # pruned+int8, student, student+int8 (docs/optimization.md)

    CompileResult: source, sourceDigest, sourceFormat, sourceSizeBytes, cacheHit, workDone, toolchain,
                   variants: dict[profile, VariantReport], ok, to_status() -> list[dict], to_dict(), to_json()
    VariantReport: profile, target, state (Ready|Failed), reason, message, chosen, format, precision,
                   quantization, artifact, digest, sizeBytes, mediaType, loadSeconds, latency (Latency),
                   metrics (Metrics), candidates (list[Candidate] each with state Chosen|Lost|Failed and why),
                   cacheKey, cacheHit, to_status() -> EdgeModel status.variants[] entry (docs/api-contract.md)
    CompileError(reason, message, fix): request-level failure (DigestMismatch, InvalidModel, UnsupportedOpset,
                   UnsupportedOperator, InvalidData, InvalidRequest, SourceUnavailable, MissingExtra,
                   UnknownInputShape);
                   raised before anything is built or published. ``to_status_variant(profile)``.

Per-variant failure reasons (state Failed, nothing published for that profile): AccuracyBudgetExceeded,
ModelSizeBudgetExceeded (every candidate over the profile's budget.maxModelSizeBytes), ConversionUnavailable,
ToolchainUnavailable, MissingExtra, PrecisionNotSupported, UnsupportedTarget, PassFailed, RunFailed,
NoCalibrationData, UnsupportedOperator (ONNX -> .tflite: an op LiteRT has no kernel for).

ONNX -> .tflite (LiteRT/Coral targets) needs the ``tflite-convert`` extra (onnx2tf + TensorFlow, run in a child
process, see ``tflite_convert``); without it those targets fail with ConversionUnavailable naming the extra.

``auto`` builds the candidates that fit the target (precision fp32 -> fp32; fp16 -> fp32, fp16; int8 -> also
dynamic and static int8), runs each in the target runtime on the evaluation data (synthetic inputs when none
are given, flagged in the metrics; their shapes from --input-shape, the model's metadata or the calibration
data, and ``auto`` refuses dims none of them fixes (UnknownInputShape); another quantization tries dynamic dims
at 8, 64 and 224), gates each on the budget (default: 1 point of top-1 with labels, else cosine >= 0.99
against the source's outputs) and publishes the fastest p50 at 1 thread; candidates within 5 % of the
fastest count as equally fast and the smallest wins. Targets not present on this host (CUDA/TensorRT) are
measured on the CPU and chosen by the target precision's preference instead.

The request types live in ``edgefleet.api.compile`` (the operator's inline compile and the compile Job build
the same ``CompileRequest``) and are re-exported here.

The cache (``cache_dir/variants/<key>``) is keyed by sha256 of (source digest, policy with data digests,
target, toolchain versions); a hit does no work (``result.workDone == 0``, ``variant.cacheHit``).
Artifact formats: ``.onnx`` (application/vnd.edgefleet.model.onnx), gzip'd ``.onnx`` when pruned
(application/vnd.edgefleet.model.onnx+gzip, starts with 1f 8b), ``.tflite``, OpenVINO IR as a zip of
model.xml + model.bin (application/vnd.edgefleet.model.openvino-ir+zip).
"""

from .core import compile_model, fetch_source, plan, toolchain_versions
from .profiles import load_profiles
from .types import (
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
)

__all__ = [
    "AccuracyBudget", "Candidate", "CompileError", "CompileRequest", "CompileResult", "Latency", "Metrics",
    "CompileTarget", "Policy", "VariantReport", "compile_model", "fetch_source", "load_profiles", "plan",
    "toolchain_versions",
]
