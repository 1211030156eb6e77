"""Report types of the compiler (plain dataclasses, camelCase on the wire); the request types are the API's
(edgefleet.api.compile), re-exported here."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, get_args

# one request for inline and Job compiles, one budget and one list of quantizations: the API's
from ..api.compile import CompileRequest as CompileRequest
from ..api.compile import CompileTarget as CompileTarget
from ..api.compile import Policy as Policy
from ..api.models import AccuracyBudget as AccuracyBudget
from ..api.models import Quantization

QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)


class CompileError(Exception):
    """A request-level problem: nothing was compiled or published.

    ``reason`` is CamelCase (DigestMismatch, InvalidModel, UnsupportedOpset, InvalidData, MissingExtra,
    SourceUnavailable, InvalidRequest), ``message`` names the cause and ``fix`` says what to do.
    """

    def __init__(self, reason: str, message: str, fix: str = ""):
        super().__init__(f"{reason}: {message}" + (f" Fix: {fix}" if fix else ""))
        self.reason = reason
        self.message = message
        self.fix = fix

    def to_status_variant(self, profile: str) -> dict[str, Any]:
        """The EdgeModel status variant for ``profile`` when the whole request failed."""
        return {
            "profile": profile, "format": None, "precision": None, "quantization": None, "artifact": None,
            "digest": None, "sizeBytes": None, "latencyP50Ms": None, "accuracyDelta": None,
            "state": "Failed", "reason": self.reason,
            "message": self.message + (f" Fix: {self.fix}" if self.fix else ""),
        }


@dataclass
class Metrics:
    samples: int = 0
    synthetic: bool = False  # evaluated on generated inputs (no evaluation data given)
    accuracy: float | None = None  # top-1 vs labels, 0..1
    referenceAccuracy: float | None = None
    accuracyDelta: float | None = None  # points, candidate - source (negative = drop)
    agreement: float | None = None  # top-1 agreement with the source outputs
    cosine: float | None = None  # mean per-sample cosine vs the source outputs
    minCosine: float | None = None
    maxAbsDiff: float | None = None


@dataclass
class Latency:
    loadSeconds: float | None = None
    p50Ms1: float | None = None
    p95Ms1: float | None = None
    threadsN: int | None = None
    p50MsN: float | None = None
    p95MsN: float | None = None
    measuredOn: str = ""  # e.g. "onnxruntime CPUExecutionProvider on this host"


@dataclass
class Candidate:
    name: str  # e.g. fp32, fp16, dynamic-int8, static-int8, litert-dynamic-int8, openvino-int8
    format: str
    precision: str
    quantization: str
    runtime: str
    state: str = "Built"  # Built | Failed | Chosen | Lost
    sha256: str | None = None
    artifact: str | None = None  # where it was published (each candidate inside the accuracy budget is)
    sizeBytes: int | None = None
    mediaType: str | None = None
    latency: Latency = field(default_factory=Latency)
    metrics: Metrics = field(default_factory=Metrics)
    withinBudget: bool | None = None
    budgetFailure: str | None = None  # names the metric that failed
    why: str | None = None  # why it lost / failed
    reason: str | None = None  # CamelCase reason when it failed to build/run


@dataclass
class VariantReport:
    profile: str
    target: CompileTarget
    state: str  # Ready | Failed
    reason: str | None = None
    message: str = ""
    chosen: str | None = None
    format: str | None = None
    precision: str | None = None
    quantization: str | None = None
    artifact: str | None = None
    digest: str | None = None
    sizeBytes: int | None = None
    mediaType: str | None = None
    sourceSizeBytes: int | None = None
    loadSeconds: float | None = None
    latency: Latency | None = None
    metrics: Metrics | None = None
    candidates: list[Candidate] = field(default_factory=list)
    # pruned / student -> how the training went and the trained model against the source (the teacher):
    # detail, epochs, loss, seconds, transferSamples, sizeBytes, teacherSizeBytes, p50Ms, teacherP50Ms,
    # agreement, accuracyDelta; or {"reason", "message"} when it failed
    training: dict[str, dict[str, Any]] | None = None
    cacheKey: str = ""
    cacheHit: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target"] = self.target.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VariantReport:
        d = dict(d)
        d["target"] = CompileTarget.model_validate(d["target"])
        d["latency"] = Latency(**d["latency"]) if d.get("latency") else None
        d["metrics"] = Metrics(**d["metrics"]) if d.get("metrics") else None
        cands = []
        for c in d.get("candidates", []):
            c = dict(c)
            c["latency"] = Latency(**c["latency"])
            c["metrics"] = Metrics(**c["metrics"])
            cands.append(Candidate(**c))
        d["candidates"] = cands
        return cls(**d)

    def to_status(self) -> dict[str, Any]:
        """The EdgeModel ``status.variants[]`` entry (docs/api-contract.md), exactly those keys."""
        return {
            "profile": self.profile,
            "format": self.format,
            "precision": self.precision,
            "quantization": self.quantization,
            "artifact": self.artifact,
            "digest": self.digest,
            "sizeBytes": self.sizeBytes,
            "latencyP50Ms": self.latency.p50Ms1 if self.latency else None,
            "accuracyDelta": self.metrics.accuracyDelta if self.metrics else None,
            "state": self.state,
            "reason": self.reason,
            "message": self.message,
            "candidates": self.published_candidates() or None,
        }

    def published_candidates(self) -> list[dict[str, Any]]:
        """status.variants[].candidates: the published candidates inside the accuracy budget (the chosen one
        first, with the variant's digest), for on-target selection."""
        out = []
        for c in sorted(self.candidates, key=lambda c: c.state != "Chosen"):
            if c.state == "Failed" or not c.withinBudget or not c.artifact:
                continue
            chosen = c.state == "Chosen"
            entry = {"name": c.name, "artifact": c.artifact, "digest": self.digest if chosen else c.sha256,
                     "format": c.format, "precision": c.precision, "quantization": c.quantization,
                     "sizeBytes": self.sizeBytes if chosen else c.sizeBytes, "latencyP50Ms": c.latency.p50Ms1,
                     "accuracyDelta": c.metrics.accuracyDelta, "agreement": c.metrics.agreement}
            out.append({k: v for k, v in entry.items() if v is not None})
        return out


@dataclass
class CompileResult:
    source: str
    sourceDigest: str
    sourceFormat: str
    sourceSizeBytes: int
    variants: dict[str, VariantReport]
    cacheHit: bool = False  # every variant came from the cache
    workDone: int = 0  # candidates built and measured in this call (0 on a full cache hit)
    toolchain: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(v.state == "Ready" for v in self.variants.values())

    def to_status(self) -> list[dict[str, Any]]:
        """EdgeModel ``status.variants`` (one entry per profile, sorted by profile name)."""
        return [self.variants[k].to_status() for k in sorted(self.variants)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "sourceDigest": self.sourceDigest, "sourceFormat": self.sourceFormat,
            "sourceSizeBytes": self.sourceSizeBytes, "cacheHit": self.cacheHit, "workDone": self.workDone,
            "toolchain": self.toolchain,
            "variants": {k: v.to_dict() for k, v in sorted(self.variants.items())},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
