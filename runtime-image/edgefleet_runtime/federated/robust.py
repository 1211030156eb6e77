"""Screening and aggregation of the clients' updates: pure numpy, no Flower.

`screen` refuses what no honest client sends (a wrong shape or type, NaN or Inf, no samples, an update far larger
than the bound) and caps the sample count each client reports; `aggregate` combines what is left with
FedAvg (sample-weighted mean; FedProx aggregates the same way) or a robust rule that ignores the counts:
TrimmedMean (per coordinate, the largest and smallest values dropped) or Median (per coordinate).

Bounds left unset follow the round's median, so they hold for any model's scale: an update whose norm is
above NORM_FACTOR x the median update norm is refused, and a reported count above SAMPLE_FACTOR x the
median count is clipped. A median needs honest clients in the majority: with fewer than 3 updates the
relative bounds cannot single out an outlier, so set maxUpdateNorm and maxSamplesPerClient for such runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

STRATEGIES = ("FedAvg", "FedProx", "TrimmedMean", "Median")
NORM_FACTOR = 3.0
SAMPLE_FACTOR = 2.0
DEFAULT_TRIM_FRACTION = 0.2


@dataclass(frozen=True)
class Update:
    """One client's answer in a round: its parameters and the sample count it reported."""

    client: str
    params: list[np.ndarray]
    samples: int


@dataclass(frozen=True)
class Refusal:
    """A client whose update (or connection) the server refused, and why."""

    client: str
    reason: str
    message: str
    round: int | None = None

    def to_dict(self) -> dict:
        out = {"client": self.client, "reason": self.reason, "message": self.message}
        return out if self.round is None else {**out, "round": self.round}


@dataclass(frozen=True)
class Limits:
    """maxUpdateNorm and maxSamplesPerClient; None: relative to the round's median (see the module doc)."""

    max_update_norm: float | None = None
    max_samples: int | None = None


@dataclass
class Screened:
    accepted: list[Update] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    clipped: list[str] = field(default_factory=list)  # clients whose sample count was capped


def update_norm(params: list[np.ndarray], start: list[np.ndarray]) -> float:
    """L2 norm of (params - start) over all tensors, in float64."""
    return math.sqrt(sum(float(np.sum((np.asarray(p, np.float64) - np.asarray(s, np.float64)) ** 2))
                         for p, s in zip(params, start, strict=True)))


def _malformed(u: Update, start: list[np.ndarray]) -> tuple[str, str] | None:
    shapes = [np.shape(p) for p in u.params]
    want = [np.shape(s) for s in start]
    if shapes != want:
        return "Malformed", f"sent tensors of shapes {shapes}; the model's are {want}"
    kinds = {np.asarray(p).dtype.kind for p in u.params}
    if not kinds <= set("fiu"):
        return "Malformed", f"sent tensors of dtype kinds {sorted(kinds)}; the model's are real numbers"
    if not all(np.all(np.isfinite(p)) for p in u.params):
        return "NonFinite", "sent NaN or Inf parameters"
    if u.samples < 1:
        return "NoSamples", f"reported {u.samples} samples; an update needs at least 1"
    return None


def screen(updates: list[Update], start: list[np.ndarray], limits: Limits, round_: int | None = None) -> Screened:
    """Refuse malformed and oversized updates, cap the reported sample counts; `start` is the round's model."""
    out = Screened()
    sound: list[Update] = []
    for u in updates:
        problem = _malformed(u, start)
        if problem:
            out.refused.append(Refusal(u.client, *problem, round=round_))
        else:
            sound.append(u)
    norms = [update_norm(u.params, start) for u in sound]
    bound = limits.max_update_norm
    if bound is None and norms and float(np.median(norms)) > 0:
        bound = NORM_FACTOR * float(np.median(norms))
    kept = []
    for u, n in zip(sound, norms, strict=True):
        if bound is not None and n > bound:
            how = "maxUpdateNorm" if limits.max_update_norm is not None else f"{NORM_FACTOR:g} x the round's median"
            out.refused.append(Refusal(u.client, "UpdateTooLarge",
                                       f"update norm {n:.4g} is above the bound {bound:.4g} ({how})", round_))
        else:
            kept.append(u)
    cap = limits.max_samples
    if cap is None and kept:
        cap = math.ceil(SAMPLE_FACTOR * float(np.median([u.samples for u in kept])))
    for u in kept:
        if cap is not None and u.samples > cap:
            out.clipped.append(u.client)
            u = Update(u.client, u.params, cap)
        out.accepted.append(u)
    return out


def fedavg(updates: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
    """Sample-weighted mean of parameter lists (FedAvg's and FedProx's server side)."""
    total = sum(n for _, n in updates)
    return [np.asarray(sum(np.asarray(p[i], np.float64) * (n / total) for p, n in updates), np.float32)
            for i in range(len(updates[0][0]))]


def trim_count(n: int, fraction: float) -> int:
    """Values dropped from each end per coordinate: ceil(fraction * n), leaving at least one."""
    return min(math.ceil(fraction * n), (n - 1) // 2)


def trimmed_mean(params: list[list[np.ndarray]], fraction: float = DEFAULT_TRIM_FRACTION) -> list[np.ndarray]:
    """Per coordinate, the mean after dropping the trim_count largest and smallest values (unweighted)."""
    k = trim_count(len(params), fraction)
    out = []
    for i in range(len(params[0])):
        stack = np.sort(np.stack([np.asarray(p[i], np.float64) for p in params]), axis=0)
        out.append(stack[k:len(params) - k].mean(axis=0).astype(np.float32))
    return out


def median(params: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Per coordinate median (unweighted)."""
    return [np.median(np.stack([np.asarray(p[i], np.float64) for p in params]), axis=0).astype(np.float32)
            for i in range(len(params[0]))]


def aggregate(strategy: str, updates: list[Update], trim_fraction: float = DEFAULT_TRIM_FRACTION
              ) -> list[np.ndarray]:
    """The round's new parameters from the accepted updates."""
    if not updates:
        raise ValueError("no updates to aggregate")
    if strategy in ("FedAvg", "FedProx"):
        return fedavg([(u.params, u.samples) for u in updates])
    if strategy == "TrimmedMean":
        return trimmed_mean([u.params for u in updates], trim_fraction)
    if strategy == "Median":
        return median([u.params for u in updates])
    raise ValueError(f"aggregation strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
