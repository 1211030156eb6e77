"""Fleet monitoring in the runtime: prediction confidence, per-class counts, drift and hard examples.

Off unless ``serve --monitoring`` (or ``--hard-examples-dir``) turns it on. It looks at one output (the
model's first unless ``--monitor-output``) when that output is ``[batch, classes]`` with at least 2
classes: rows are probabilities when they lie in [0, 1] and sum to 1, else logits (softmaxed here).

Metrics (Prometheus, on ``/metrics``):

- ``edgefleet_runtime_prediction_confidence``: histogram of the top-1 probability per prediction
- ``edgefleet_runtime_predictions_total{output, class}``: predicted class counts (the first
  ``MAX_CLASSES`` classes; the rest as ``class="other"``)
- ``edgefleet_runtime_low_confidence_predictions_total``: predictions below ``--uncertain-below``
- ``edgefleet_runtime_drift_psi{statistic}``: population stability index of the last ``--drift-window``
  predictions against the reference distribution (``--drift-reference``, from ``bench``) for three
  statistics: ``classes`` (predicted class), ``confidence`` (confidence bucket) and ``input`` (per-sample
  mean of the first input, in the reference's decile bins); ``edgefleet_runtime_drifting`` is 1 when the
  window is full and any PSI is at or above ``--drift-threshold`` (0.2 is the usual "significant shift")

Hard examples (``HardExamples``): predictions below the confidence threshold, sampled at a rate, are
handed to a writer thread through a bounded queue (the request never waits on the disk) and spooled as
one ``.npz`` per example (inputs, outputs, ``meta`` = JSON bytes: model, digest, confidence, time).
The spool is bounded in files and bytes; when full, new examples are dropped and counted, nothing
already spooled is touched. Files are written to a temporary name and renamed, so a restart finds
only whole examples and continues from what is on disk.
"""

from __future__ import annotations

import bisect
import io
import json
import logging
import math
import os
import queue
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

log = logging.getLogger("edgefleet_runtime.monitor")

CONFIDENCE_EDGES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
MAX_CLASSES = 1000
EPSILON = 1e-4  # PSI smoothing for empty bins


# ----------------------------------------------------------------------------- statistics
def probabilities(out: np.ndarray) -> np.ndarray:
    """Rows of ``out`` ([batch, classes]) as probabilities: as they are when they already are, else softmax."""
    x = out.astype(np.float64, copy=False)
    if x.min() >= 0.0 and x.max() <= 1.0 and np.allclose(x.sum(1), 1.0, atol=1e-3):
        return x
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf logits give NaN rows, which callers leave out
        e = np.exp(x - x.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)


def confidence_bins(conf: np.ndarray) -> np.ndarray:
    """Index of the first edge >= conf (the Prometheus ``le`` bucket)."""
    return np.searchsorted(CONFIDENCE_EDGES, conf, side="left").clip(0, len(CONFIDENCE_EDGES) - 1)


def input_means(first_input: np.ndarray) -> np.ndarray:
    n = first_input.shape[0] if first_input.ndim else 1
    return first_input.reshape(n, -1).astype(np.float64, copy=False).mean(1)


def psi(actual: ArrayLike, expected: ArrayLike) -> float:
    """Population stability index of two count (or proportion) vectors of the same bins."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    a = np.maximum(a / max(a.sum(), 1e-12), EPSILON)
    e = np.maximum(e / max(e.sum(), 1e-12), EPSILON)
    return float(((a - e) * np.log(a / e)).sum())


def distribution(output: np.ndarray, first_input: np.ndarray | None, output_name: str = "") -> dict | None:
    """The reference distribution of evaluation outputs (and inputs) that ``--drift-reference`` reads."""
    if output.ndim != 2 or output.shape[1] < 2:
        return None
    p = probabilities(output)
    classes = np.bincount(p.argmax(1), minlength=p.shape[1])
    conf = np.bincount(confidence_bins(p.max(1)), minlength=len(CONFIDENCE_EDGES))
    d = {
        "output": output_name,
        "samples": int(output.shape[0]),
        "classes": (classes / classes.sum()).round(6).tolist(),
        "confidenceEdges": list(CONFIDENCE_EDGES),
        "confidence": (conf / conf.sum()).round(6).tolist(),
    }
    if first_input is not None:
        means = input_means(first_input)
        edges = np.unique(np.quantile(means, np.linspace(0.1, 0.9, 9)))
        counts = np.bincount(np.searchsorted(edges, means, side="right"), minlength=len(edges) + 1)
        d["inputEdges"] = edges.tolist()
        d["input"] = (counts / counts.sum()).round(6).tolist()
    return d


def read_reference(path: str) -> dict:
    """A ``bench`` report (its reference model's distribution) or a distribution object; ValueError naming
    the flag and the fix."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--drift-reference {path}: not readable JSON ({e})") from e
    if isinstance(doc, dict) and doc.get("kind") == "BenchReport":
        doc = (doc.get("results") or [{}])[0].get("distribution")
    if not isinstance(doc, dict) or not isinstance(doc.get("classes"), list) or not doc["classes"]:
        raise ValueError(
            f"--drift-reference {path}: no class distribution in it; pass the JSON report of "
            "edgefleet-runtime bench on the evaluation data (its reference model's 'distribution')"
        )
    if list(doc.get("confidenceEdges", CONFIDENCE_EDGES)) != list(CONFIDENCE_EDGES):
        raise ValueError(f"--drift-reference {path}: confidence bins differ from this runtime's; re-run bench")
    for key in ("classes", "confidence", "input", "inputEdges"):
        values = doc.get(key, [])
        if not isinstance(values, list) or not all(isinstance(v, int | float) and v == v for v in values):
            raise ValueError(f"--drift-reference {path}: {key} must be a list of numbers; re-run bench")
    if "input" in doc and len(doc["input"]) != len(doc.get("inputEdges", [])) + 1:
        raise ValueError(f"--drift-reference {path}: input needs one more bin than inputEdges; re-run bench")
    if "confidence" in doc and len(doc["confidence"]) != len(CONFIDENCE_EDGES):
        raise ValueError(f"--drift-reference {path}: confidence needs {len(CONFIDENCE_EDGES)} bins; re-run bench")
    return doc


# ----------------------------------------------------------------------------- the live window
class Window:
    """The last ``size`` predictions' bins (class, confidence, input), with counts kept per bin."""

    KEYS = ("classes", "confidence", "input")

    def __init__(self, size: int, classes: int, input_bins: int):
        self.size = size
        self.filled = 0
        self._pos = 0
        self._rings = {k: [0] * size for k in self.KEYS}
        self.counts = {"classes": [0] * classes, "confidence": [0] * len(CONFIDENCE_EDGES), "input": [0] * input_bins}

    def add(self, bins: dict) -> None:
        """``bins``: per key, the rows' bin indexes (sequences of ints, oldest first)."""
        n = len(bins["classes"])
        for k in self.KEYS:
            ring, counts, pos, filled = self._rings[k], self.counts[k], self._pos, self.filled
            for b in bins[k]:
                if filled == self.size:
                    counts[ring[pos]] -= 1
                else:
                    filled += 1
                ring[pos] = b
                counts[b] += 1
                pos = pos + 1 if pos + 1 < self.size else 0
        self._pos = (self._pos + n) % self.size
        self.filled = min(self.filled + n, self.size)


def _top1(row: list[float]) -> tuple[int, float]:
    """(class, probability) of one row of probabilities or logits, in plain Python (batch 1 is the
    common case and numpy's per-call cost dominates at 10 values)."""
    top = max(row)
    cls = row.index(top)
    if top <= 1.0 and min(row) >= 0.0 and abs(sum(row) - 1.0) <= 1e-3:
        return cls, top
    return cls, 1.0 / sum(math.exp(v - top) for v in row)


class Monitor:
    """Per-request observation of the watched output; exposes its metrics as a Prometheus collector."""

    def __init__(
        self,
        output: str | None = None,
        uncertain_below: float = 0.5,
        reference: dict | None = None,
        window: int = 1000,
        threshold: float = 0.2,
        hard_examples: HardExamples | None = None,
    ):
        if not 0.0 < uncertain_below <= 1.0:
            raise ValueError("--uncertain-below must be in (0, 1]: the confidence under which a prediction is unsure")
        if window < 1 or threshold <= 0:
            raise ValueError("--drift-window must be at least 1 and --drift-threshold above 0")
        self.output = output
        self.uncertain_below = uncertain_below
        self.reference = reference
        self.threshold = threshold
        self.hard_examples = hard_examples
        self.errors = 0
        self._lock = threading.Lock()
        self._classes = [0] * 0
        self._other = 0
        self._confidence = [0] * len(CONFIDENCE_EDGES)
        self._confidence_sum = 0.0
        self._low = 0
        self._output_name = output or ""
        self._input_edges = list(reference.get("inputEdges", [])) if reference else []
        self.window: Window | None = None
        self.window_size = window
        if reference:
            self.use_reference(reference)

    def use_reference(self, reference: dict) -> None:
        """Compare the live window with ``reference`` from now on (``serve --drift-eval`` sets it after load)."""
        edges = list(reference.get("inputEdges", []))
        window = Window(self.window_size, len(reference["classes"]), len(edges) + 1)
        with self._lock:
            self.reference, self._input_edges, self.window = reference, edges, window

    def observe(self, model, feeds: dict, results: dict) -> None:
        """Called after every successful inference with the served ``LoadedModel``; never fails the request."""
        try:
            self._observe(model, feeds, results)
        except Exception as e:  # a monitoring bug must not turn answers into errors
            self.errors += 1
            if self.errors == 1:
                log.error("monitoring failed; answers are unaffected", extra={"error": f"{type(e).__name__}: {e}"})

    def _observe(self, model, feeds: dict, results: dict) -> None:
        name = self.output or model.backend.outputs[0].name
        out = results.get(name)
        if out is None or out.ndim != 2 or out.shape[1] < 2 or out.shape[0] == 0:
            return
        if out.shape[0] == 1:
            cls, conf = _top1(out[0].tolist())
            classes, confs = [cls], [conf]
        else:
            p = probabilities(out)
            classes, confs = p.argmax(1).tolist(), p.max(1).tolist()
        all_confs = confs  # NaN where the model answered NaN/inf: never below a threshold, so never a hard example
        if not all(math.isfinite(c) for c in confs):  # left out of every statistic, so the metrics stay finite
            keep = [i for i, c in enumerate(confs) if math.isfinite(c)]
            classes, confs = [classes[i] for i in keep], [confs[i] for i in keep]
            feeds = {} if len(keep) != len(all_confs) else feeds
            if not keep:
                return
        cbins = [min(bisect.bisect_left(CONFIDENCE_EDGES, c), len(CONFIDENCE_EDGES) - 1) for c in confs]
        low = sum(c < self.uncertain_below for c in confs)
        with self._lock:
            self._output_name = name
            self._count(classes, cbins, out.shape[1])
            self._confidence_sum += sum(confs)
            self._low += low
            if self.window is not None:
                self._add_window(classes, cbins, feeds)
        if self.hard_examples is not None:
            below = self.hard_examples.below
            below = self.uncertain_below if below is None else below
            hard = [i for i, c in enumerate(all_confs) if c < below]
            if hard:
                self.hard_examples.offer(model, feeds, results, confs, hard)

    def _count(self, classes: list[int], cbins: list[int], width: int) -> None:
        counts = self._classes
        if len(counts) < min(width, MAX_CLASSES):
            counts.extend([0] * (min(width, MAX_CLASSES) - len(counts)))
        for c in classes:
            if c < MAX_CLASSES:
                counts[c] += 1
            else:
                self._other += 1
        for b in cbins:
            self._confidence[b] += 1

    def _add_window(self, classes: list[int], cbins: list[int], feeds: dict) -> None:
        window = self.window
        if window is None:  # no reference yet: nothing to compare
            return
        k = len(window.counts["classes"])
        ibins = [0] * len(classes)
        if self._input_edges and feeds:
            first = next(iter(feeds.values()))
            if len(classes) == 1 and first.size:  # batch 1: one sum is ~5x cheaper than mean()
                means = [float(first.sum()) / first.size]
            else:
                means = input_means(first).tolist()
            if len(means) == len(classes):
                ibins = [bisect.bisect_right(self._input_edges, m) for m in means]
        window.add({"classes": [min(c, k - 1) for c in classes], "confidence": cbins, "input": ibins})

    def drift(self) -> dict[str, float]:
        """PSI per statistic of the current window against the reference ({} without a reference)."""
        if self.window is None or self.window.filled == 0 or self.reference is None:
            return {}
        out = {}
        for k in ("classes", "confidence", "input"):
            ref = self.reference.get(k)
            if ref:
                out[k] = round(psi(self.window.counts[k][: len(ref)], ref), 6)
        return out

    # prometheus_client calls this on every scrape (registered with the serve registry)
    def collect(self):
        with self._lock:
            classes, other = list(self._classes), self._other
            conf, conf_sum, low = list(self._confidence), self._confidence_sum, self._low
            drift = self.drift()
            full = self.window is not None and self.window.filled >= self.window.size
            filled = self.window.filled if self.window is not None else 0
        h = HistogramMetricFamily(
            "edgefleet_runtime_prediction_confidence", "Top-1 probability of each prediction", labels=["output"]
        )
        cumulative = np.cumsum(conf)
        buckets = [(str(e), float(c)) for e, c in zip(CONFIDENCE_EDGES, cumulative, strict=True)]
        buckets.append(("+Inf", float(cumulative[-1])))
        h.add_metric([self._output_name], buckets, conf_sum)
        yield h
        c = CounterMetricFamily(
            "edgefleet_runtime_predictions", "Predictions by top-1 class", labels=["output", "class"]
        )
        for i, n in enumerate(classes):
            c.add_metric([self._output_name, str(i)], n)
        if other:
            c.add_metric([self._output_name, "other"], other)
        yield c
        yield CounterMetricFamily(
            "edgefleet_runtime_low_confidence_predictions",
            f"Predictions with top-1 probability below {self.uncertain_below:g}",
            value=low,
        )
        if self.window is not None:
            g = GaugeMetricFamily(
                "edgefleet_runtime_drift_psi", "PSI of the live window against the reference", labels=["statistic"]
            )
            for k, v in drift.items():
                g.add_metric([k], v)
            yield g
            yield GaugeMetricFamily("edgefleet_runtime_drift_window_samples", "Predictions in the window", value=filled)
            drifting = full and any(v >= self.threshold for v in drift.values())
            yield GaugeMetricFamily(
                "edgefleet_runtime_drifting",
                f"1 when the full window's PSI reaches {self.threshold:g} for any statistic",
                value=1 if drifting else 0,
            )
        if self.hard_examples is not None:
            yield from self.hard_examples.collect()


# ----------------------------------------------------------------------------- hard examples
class HardExamples:
    """A bounded on-disk spool of low-confidence inputs and outputs, written off the request path."""

    QUEUE = 64  # examples waiting for the writer; beyond it they are dropped (reason queue_full)

    def __init__(self, directory: str, sample_rate: float = 1.0, max_count: int = 1000, max_bytes: int = 64 << 20,
                 below: float | None = None):
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError("--hard-examples-sample-rate must be in (0, 1]")
        if below is not None and not 0.0 < below <= 1.0:
            raise ValueError("--hard-examples-below must be in (0, 1]: the confidence under which inputs are kept")
        self.below = below  # None: the monitor's --uncertain-below
        if max_count < 1 or max_bytes < 1:
            raise ValueError("--hard-examples-max-count and --hard-examples-max-bytes must be at least 1")
        self.dir = Path(directory)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--hard-examples-dir {directory}: cannot create it ({e})") from e
        self.sample_rate = sample_rate
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.count, self.bytes = self._scan()
        self.spooled = 0
        self.dropped: dict[str, int] = {"full": 0, "queue_full": 0, "write_failed": 0}
        self._queue: queue.Queue = queue.Queue(self.QUEUE)
        self._lock = threading.Lock()
        # called with the number of stored examples after each write (the uploader)
        self.on_spooled: Callable[[int], None] | None = None
        self._writer = threading.Thread(target=self._write_loop, name="hard-examples", daemon=True)
        self._writer.start()

    def _scan(self) -> tuple[int, int]:
        count = size = 0
        for f in self.dir.iterdir():
            if f.name.startswith(".tmp-"):
                f.unlink(missing_ok=True)  # a write cut short by a crash
            elif f.suffix == ".npz" and f.is_file():
                count += 1
                size += f.stat().st_size
        return count, size

    def offer(self, model, feeds: dict, results: dict, conf: list[float], rows: list[int]) -> None:
        """Queue the ``rows`` of this request (sampled); never blocks."""
        for i in rows:
            if self.count >= self.max_count or self.bytes >= self.max_bytes:  # full: drop before copying
                with self._lock:
                    self.dropped["full"] += 1
                continue
            if self.sample_rate < 1.0 and random.random() >= self.sample_rate:
                continue
            item = (
                {k: v[i : i + 1].copy() for k, v in feeds.items()},
                {k: v[i : i + 1].copy() for k, v in results.items()},
                {"model": model.name, "digest": model.digest, "confidence": float(conf[i]), "time": time.time()},
            )
            try:
                self._queue.put_nowait(item)
            except queue.Full:
                with self._lock:
                    self.dropped["queue_full"] += 1

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._write(*item)
            except OSError as e:
                with self._lock:
                    self.dropped["write_failed"] += 1
                log.warning("hard example not written", extra={"error": str(e)})
            finally:
                self._queue.task_done()

    def _write(self, inputs: dict, outputs: dict, meta: dict) -> None:
        buf = io.BytesIO()
        arrays = {f"input.{k}": v for k, v in inputs.items()}
        arrays.update({f"output.{k}": v for k, v in outputs.items()})
        arrays["meta"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8)
        np.savez(buf, **arrays)
        data = buf.getvalue()
        with self._lock:
            if self.count + 1 > self.max_count or self.bytes + len(data) > self.max_bytes:
                self.dropped["full"] += 1
                return
            self.count += 1
            self.bytes += len(data)
        name = f"{time.time_ns():020d}-{os.urandom(4).hex()}.npz"
        tmp = self.dir / f".tmp-{name}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.dir / name)
        except OSError:
            tmp.unlink(missing_ok=True)
            with self._lock:
                self.count -= 1
                self.bytes -= len(data)
            raise
        with self._lock:
            self.spooled += 1
            count = self.count
        if self.on_spooled is not None:
            self.on_spooled(count)

    def oldest(self, limit: int) -> list[Path]:
        """Up to ``limit`` spooled examples, oldest first (names start with the time they were written)."""
        return sorted(f for f in self.dir.glob("*.npz") if not f.name.startswith(".tmp-"))[:limit]

    def remove(self, files: list[Path]) -> None:
        """Delete examples that left the node (uploaded), freeing their room in the spool."""
        for f in files:
            try:
                size = f.stat().st_size
                f.unlink()
            except FileNotFoundError:
                continue
            with self._lock:  # a file another process spooled (a surge pod) was never counted here
                self.count = max(0, self.count - 1)
                self.bytes = max(0, self.bytes - size)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued example is written or dropped (shutdown, tests); False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def collect(self):
        with self._lock:
            count, size, spooled, dropped = self.count, self.bytes, self.spooled, dict(self.dropped)
        yield GaugeMetricFamily("edgefleet_runtime_hard_examples_stored", "Hard examples in the spool", value=count)
        yield GaugeMetricFamily("edgefleet_runtime_hard_examples_stored_bytes", "Bytes in the spool", value=size)
        yield CounterMetricFamily("edgefleet_runtime_hard_examples_spooled", "Hard examples written", value=spooled)
        c = CounterMetricFamily(
            "edgefleet_runtime_hard_examples_dropped", "Hard examples not kept, by reason", labels=["reason"]
        )
        for reason, n in sorted(dropped.items()):
            c.add_metric([reason], n)
        yield c


def read_example(path: str | os.PathLike) -> tuple[dict, dict, dict]:
    """(inputs, outputs, meta) of one spooled example."""
    with np.load(path, allow_pickle=False) as z:
        inputs = {k[len("input.") :]: z[k] for k in z.files if k.startswith("input.")}
        outputs = {k[len("output.") :]: z[k] for k in z.files if k.startswith("output.")}
        meta = json.loads(z["meta"].tobytes())
    return inputs, outputs, meta
