"""The compile request: what the compiler builds, for the inline compile and the compile Job alike.

Built from the kinds in ``models`` (a HardwareProfile's target and budget, an EdgeModel's optimization), never
copied from them: the operator's inline path hands a `CompileRequest` to ``edgefleet.compiler``; the Job path
renders the same object into ``edgefleet compile`` flags (render/compile_job.py), which the compiler's CLI
parses back into one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from .models import (
    AccuracyBudget,
    Distillation,
    EdgeModel,
    HardwareProfileSpec,
    Optimization,
    Pruning,
    Quantization,
    Target,
)


class CompileTarget(Target):
    """A HardwareProfile's spec.target with its spec.budget.maxModelSizeBytes: what one variant is compiled to."""

    max_model_size_bytes: Annotated[int, Field(ge=1)] | None = None
    """HardwareProfile.spec.budget.maxModelSizeBytes: larger candidates are refused."""

    @classmethod
    def of_profile(cls, spec: HardwareProfileSpec | dict[str, Any]) -> CompileTarget:
        """The target of a HardwareProfile spec (a model or its wire form), with its budget's size limit."""
        if isinstance(spec, HardwareProfileSpec):
            spec = spec.to_dict()
        limit = (spec.get("budget") or {}).get("maxModelSizeBytes")
        return cls.model_validate({**spec["target"], **({"maxModelSizeBytes": limit} if limit else {})})

    def to_dict(self) -> dict[str, Any]:
        """camelCase, unset fields left out (the form reports, cache keys and profiles.json carry)."""
        return self.model_dump(by_alias=True, exclude_none=True)


@dataclass(frozen=True)
class Policy:
    """EdgeModel.spec.optimization with its data refs resolved to local paths, plus how to measure."""

    quantization: Quantization = "auto"
    sparsity: float = 0.0
    calibration: Path | None = None  # .npz file, .npy file or a directory of .npy files
    evaluation: Path | None = None
    accuracyBudget: AccuracyBudget | None = None  # None: 1 point of top-1 with labels, else cosine >= 0.99
    timingRuns: int = 50  # timed runs per thread setting (warm-up excluded)
    threads: int | None = None  # "N threads" for the second latency figure; default os.cpu_count()
    inputShapes: dict[str, list[int]] = field(default_factory=dict)  # input name -> every dim (batch included)
    # test hook (operator setting compile_host_latency_ms): candidate name -> the p50 at 1 thread (ms) the host
    # reports instead of its measurement, so a test can make the host prefer one candidate; part of the cache key
    hostLatencyMs: dict[str, float] = field(default_factory=dict)
    pruning: Pruning | None = None  # structured pruning + fine-tuning (pruned, pruned+int8 candidates)
    distillation: Distillation | None = None  # a student trained on the source's outputs (student candidates)

    @classmethod
    def of(cls, opt: Optimization, calibration: Path | None, evaluation: Path | None, timing_runs: int,
           host_latency_ms: dict[str, float] | None = None) -> Policy:
        """The policy of an EdgeModel's spec.optimization, its data found at ``calibration``/``evaluation``."""
        return cls(quantization=opt.quantization, sparsity=opt.sparsity, calibration=calibration,
                   evaluation=evaluation, accuracyBudget=opt.accuracy_budget, timingRuns=timing_runs,
                   inputShapes=dict(opt.input_shapes or {}), hostLatencyMs=dict(host_latency_ms or {}),
                   pruning=opt.pruning, distillation=opt.distillation)


SOURCE_MAX_BYTES = 2 << 30  # ONNX protobufs end at 2 GiB
SOURCE_DEADLINE_SECONDS = 600.0


@dataclass(frozen=True)
class CompileRequest:
    """source: a path, https:// URL or oci://host[:port]/repo(:tag|@sha256:..); digest: expected sha256.
    A URL source is read within sourceMaxBytes and sourceDeadlineSeconds (all requests and redirects together)."""

    source: str
    targets: dict[str, CompileTarget]
    policy: Policy = field(default_factory=Policy)
    digest: str | None = None
    name: str | None = None  # model name used in artifact refs; default: source file stem
    sourceMaxBytes: int = SOURCE_MAX_BYTES
    sourceDeadlineSeconds: float = SOURCE_DEADLINE_SECONDS

    @classmethod
    def of(cls, model: EdgeModel, targets: dict[str, HardwareProfileSpec], source: str, policy: Policy,
           source_max_bytes: int = SOURCE_MAX_BYTES, source_deadline_seconds: float = SOURCE_DEADLINE_SECONDS
           ) -> CompileRequest:
        """What to compile for an EdgeModel: its source (found at ``source``), one target per profile spec."""
        return cls(source=source, digest=model.spec.source.digest, policy=policy, name=model.metadata["name"],
                   targets={name: CompileTarget.of_profile(spec) for name, spec in targets.items()},
                   sourceMaxBytes=source_max_bytes, sourceDeadlineSeconds=source_deadline_seconds)
