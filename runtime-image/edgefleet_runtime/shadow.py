"""Shadow traffic: a sample of live requests also runs on a candidate variant; clients get only the served model's
answers, and how often the candidate agrees with it is exported as Prometheus metrics.

Per output and per sample (row of the batch): ``top1`` agreement (same argmax along the last axis; outputs with
one value per sample have none) and the ``cosine`` similarity of the two rows. Counters, so a reader (the
operator) takes ratios over any window:

    edgefleet_runtime_shadow_samples_total{candidate,output}        samples compared
    edgefleet_runtime_shadow_top1_agree_total{candidate,output}     of them, same argmax
    edgefleet_runtime_shadow_cosine_sum_total{candidate,output}     sum of their cosines
    edgefleet_runtime_shadow_agreement{candidate,output,kind}       the ratios so far (kind: top1, cosine)
    edgefleet_runtime_shadow_dropped_total{candidate}               requests not mirrored: the queue was full
    edgefleet_runtime_shadow_errors_total{candidate}                candidate runs that failed

The candidate runs on one background thread behind a bounded queue: a slow or failing candidate never delays
or fails a client's request (its requests are dropped and counted instead).
"""

from __future__ import annotations

import logging
import queue
import random
import threading

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge

log = logging.getLogger("edgefleet_runtime.shadow")

QUEUE = 16  # requests waiting for the candidate; beyond it they are dropped


class ShadowMetrics:
    def __init__(self, registry: CollectorRegistry):
        labels = ["candidate", "output"]
        self.samples = Counter("edgefleet_runtime_shadow_samples", "Samples mirrored to the shadow candidate and "
                               "compared", labels, registry=registry)
        self.top1 = Counter("edgefleet_runtime_shadow_top1_agree", "Compared samples whose argmax (last axis) is the "
                            "served model's", labels, registry=registry)
        self.cosine = Counter("edgefleet_runtime_shadow_cosine_sum", "Sum over compared samples of the cosine "
                              "similarity of the candidate's output to the served model's", labels, registry=registry)
        self.agreement = Gauge("edgefleet_runtime_shadow_agreement", "Agreement of the shadow candidate with the "
                               "served model so far, by kind (top1, cosine)", [*labels, "kind"], registry=registry)
        self.dropped = Counter("edgefleet_runtime_shadow_dropped", "Requests not mirrored because the shadow queue "
                               "was full", ["candidate"], registry=registry)
        self.errors = Counter("edgefleet_runtime_shadow_errors", "Shadow candidate runs that failed", ["candidate"],
                              registry=registry)


def compare(served: np.ndarray, candidate: np.ndarray) -> tuple[int, int | None, float]:
    """(samples, samples with the same argmax or None when each sample has one value, sum of cosines)."""
    a = np.asarray(served, dtype=np.float64)
    b = np.asarray(candidate, dtype=np.float64)
    if a.shape != b.shape:
        return (a.shape[0] if a.ndim else 1), 0, 0.0  # another shape: no agreement at all
    a = a.reshape(a.shape[0], -1) if a.ndim > 1 else a.reshape(-1, 1)
    b = b.reshape(a.shape)
    n = a.shape[0]
    top1 = int(np.sum(a.argmax(axis=1) == b.argmax(axis=1))) if a.shape[1] > 1 else None
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.sum(a * b, axis=1)
    cos = np.where(norms > 0, dots / np.where(norms > 0, norms, 1), np.where(np.all(a == b, axis=1), 1.0, 0.0))
    return n, top1, float(np.sum(cos))


class Shadow:
    """Mirrors a ``sample_rate`` fraction of requests to ``candidate`` (an app.LoadedModel)."""

    def __init__(self, candidate, sample_rate: float, metrics: ShadowMetrics, rng: random.Random | None = None):
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"shadow sampleRate {sample_rate} must be between 0 and 1")
        self.candidate = candidate
        self.digest = candidate.digest
        self.sample_rate = sample_rate
        self.metrics = metrics
        self.rng = rng or random.Random()
        self._totals: dict[str, list[float]] = {}  # output -> [samples, top1 agree, top1 samples, cosine sum]
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shadow", daemon=True)
        self._thread.start()

    def offer(self, feeds: dict, results: dict) -> None:
        """Called on a client's request after its answer is computed; never blocks, never raises."""
        if self.sample_rate <= 0 or self.rng.random() >= self.sample_rate:
            return
        try:
            self._queue.put_nowait((feeds, results))
        except queue.Full:
            self.metrics.dropped.labels(self.digest).inc()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                feeds, results = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._compare(feeds, results)
            except Exception as e:  # noqa: BLE001 - a failing candidate is counted, never raised to a client
                self.metrics.errors.labels(self.digest).inc()
                log.warning("shadow candidate failed", extra={"candidate": self.digest, "error": str(e)[:300]})
            finally:
                self._queue.task_done()

    def _compare(self, feeds: dict, results: dict) -> None:
        names = [n for n in results if n in self.candidate.outputs]
        out = self.candidate.backend.run(feeds, names)
        for name in names:
            n, top1, cos = compare(results[name], out[name])
            t = self._totals.setdefault(name, [0, 0, 0, 0.0])
            t[0] += n
            t[3] += cos
            self.metrics.samples.labels(self.digest, name).inc(n)
            self.metrics.cosine.labels(self.digest, name).inc(cos)
            self.metrics.agreement.labels(self.digest, name, "cosine").set(t[3] / t[0])
            if top1 is not None:
                t[1] += top1
                t[2] += n
                self.metrics.top1.labels(self.digest, name).inc(top1)
                self.metrics.agreement.labels(self.digest, name, "top1").set(t[1] / t[2])
