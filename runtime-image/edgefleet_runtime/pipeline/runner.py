"""The pipeline runner: one thread per source, one inference thread (the model in-process, through the runtime's
backends, with its declared transform), one delivery thread per sink reading that sink's disk queue.

Frames wait for the model in a small bounded buffer (the oldest is dropped and counted when the model falls
behind); results wait for their sink on disk (bounded; oldest dropped and counted when full) and are delivered in
order: a batch leaves the queue only once the sink acknowledged it."""

from __future__ import annotations

import collections
import logging
import os
import threading
import time

import numpy as np
import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .. import detect
from ..app import LoadedModel
from ..preprocess import OUTPUT_INDICES, OUTPUT_LABELS, OUTPUT_SCORES, ImageError
from . import sources
from .config import PipelineConfig, Sink, Source
from .diskqueue import DiskQueue, QueueFullItem
from .sinks import open_sink

log = logging.getLogger("edgefleet_runtime.pipeline")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
MAX_RAW_OUTPUT_VALUES = 1024  # results without top-k carry raw outputs up to this size (else only their shape)
BACKOFF_FIRST, BACKOFF_MAX = 0.2, 5.0


class PipelineMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.frames = Counter("edgefleet_pipeline_frames", "Frames taken from a source", ["source"], registry=r)
        self.dropped = Counter("edgefleet_pipeline_frames_dropped", "Frames dropped before the model, by reason "
                               "(busy: the model fell behind)", ["source", "reason"], registry=r)
        self.bad = Counter("edgefleet_pipeline_bad_input", "Refused input, by reason (unreachable, corrupt, "
                           "too_large, unsupported, unreadable, inference_failed, error)", ["source", "reason"],
                           registry=r)
        self.inference = Histogram("edgefleet_pipeline_inference_seconds", "Transform and model run of one frame",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.capture_to_sink = Histogram("edgefleet_pipeline_capture_to_sink_seconds", "From capture to the sink's "
                                         "acknowledgement", ["sink"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("edgefleet_pipeline_queue_depth", "Results waiting on disk for a sink", ["sink"],
                                 registry=r)
        self.queue_dropped = Counter("edgefleet_pipeline_queue_dropped", "Oldest results dropped from a full queue",
                                     ["sink"], registry=r)
        self.delivered = Counter("edgefleet_pipeline_results_delivered", "Results a sink acknowledged", ["sink"],
                                 registry=r)
        self.sink_errors = Counter("edgefleet_pipeline_sink_errors", "Failed deliveries (retried)", ["sink"],
                                   registry=r)
        self.sources = Health("source", "the source cannot be opened or read", r)
        self.sinks = Health("sink", "deliveries fail", r)


class Health:
    """Whether each source (or sink) works now, for the operator (EdgeDeployment Degraded) and alerts:
    ``edgefleet_pipeline_<what>_up`` is 1 or 0, ``..._down_seconds`` how long it has failed (0 while up). A part
    not tried yet has neither."""

    def __init__(self, what: str, down: str, registry: CollectorRegistry):
        self.up_gauge = Gauge(f"edgefleet_pipeline_{what}_up", f"1 when the {what} works, 0 while {down}", [what],
                              registry=registry)
        self.down_gauge = Gauge(f"edgefleet_pipeline_{what}_down_seconds", f"How long {down} (0 while it works)",
                                [what], registry=registry)
        self.down_since: dict[str, float | None] = {}
        self._lock = threading.Lock()

    def up(self, name: str) -> None:
        self._set(name, None)

    def down(self, name: str) -> None:
        self._set(name, self.down_since.get(name) or time.monotonic())

    def _set(self, name: str, since: float | None) -> None:
        with self._lock:
            first = name not in self.down_since
            if not first and self.down_since[name] == since:
                return
            self.down_since[name] = since
        self.up_gauge.labels(name).set(0 if since else 1)
        if first:
            self.down_gauge.labels(name).set_function(lambda: self._down_seconds(name))

    def _down_seconds(self, name: str) -> float:
        since = self.down_since.get(name)
        return round(time.monotonic() - since, 1) if since else 0.0


def _detections(results: dict[str, np.ndarray]) -> list[dict]:
    """One frame's boxes: [{box: [x1, y1, x2, y2] in fractions of the model's input, score, class, label}]."""
    count = int(results[detect.OUTPUT_COUNT][0])
    labels = results.get(detect.OUTPUT_LABELS)
    return [{"box": [round(float(v), 4) for v in results[detect.OUTPUT_BOXES][0][k]],
             "score": round(float(results[detect.OUTPUT_SCORES][0][k]), 4),
             "class": int(results[detect.OUTPUT_CLASSES][0][k]),
             **({"label": labels[0][k].decode()} if labels is not None else {})} for k in range(count)]


class SinkWorker:
    def __init__(self, sink: Sink, queue: DiskQueue, pipeline: str, metrics: PipelineMetrics):
        self.sink, self.queue, self.metrics = sink, queue, metrics
        self.client = open_sink(sink, pipeline)
        self.wake = threading.Event()
        self.last_error: str | None = None

    def run(self, stop: threading.Event) -> None:
        delay = BACKOFF_FIRST
        name = self.sink.name
        while not stop.is_set():
            self.metrics.queue_depth.labels(name).set(len(self.queue))
            items = self.queue.peek(self.sink.batch)
            if not items:
                self.wake.wait(0.05)
                self.wake.clear()
                continue
            try:
                self.client.send(items)
            except Exception as e:  # SinkError, or a client library's surprise: the batch stays queued
                self.metrics.sink_errors.labels(name).inc()
                self.metrics.sinks.down(name)
                if str(e) != self.last_error:
                    log.warning("sink unavailable; results wait on disk", extra={"sink": name, "error": str(e),
                                                                                 "queued": len(self.queue)})
                self.last_error = str(e)
                stop.wait(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            self.metrics.sinks.up(name)
            if self.last_error is not None:
                log.info("sink back", extra={"sink": name, "queued": len(self.queue)})
                self.last_error = None
            delay = BACKOFF_FIRST
            self.queue.ack(items[-1].seq)
            now = time.time()
            for item in items:
                self.metrics.capture_to_sink.labels(name).observe(max(0.0, now - item.captured))
            self.metrics.delivered.labels(name).inc(len(items))
        self.metrics.queue_depth.labels(name).set(len(self.queue))
        self.client.close()


class Pipeline:
    def __init__(self, config: PipelineConfig, model: LoadedModel, metrics: PipelineMetrics | None = None):
        if model.transform is None or model.transform.image is None or model.transform.input is None:
            raise ValueError("the pipeline needs the model's image pre-processing (EdgeModel "
                             "spec.preprocessing.image, --transform): it turns frames into the model's input")
        self.config, self.model = config, model
        self.metrics = metrics or PipelineMetrics()
        os.makedirs(config.queue.path, exist_ok=True)
        self.workers = [SinkWorker(s, DiskQueue(os.path.join(config.queue.path, f"{config.name}-{s.name}.sqlite"),
                                                config.queue.max_items, config.queue.max_item_bytes,
                                                config.queue.max_bytes),
                                   config.name, self.metrics) for s in config.sinks]
        self.pending: collections.deque = collections.deque()
        self.cond = threading.Condition()
        self.sources_left = len(config.sources)
        self.busy = False
        self.processed = 0

    # ------------------------------------------------------------------ sources
    def _run_source(self, src: Source, stop: threading.Event) -> None:
        delay = 1.0
        try:
            while not stop.is_set():
                try:
                    for item in sources.frames(src, stop):
                        self.metrics.sources.up(src.name)  # opened and read
                        if isinstance(item, sources.Bad):
                            self._bad(src.name, item.reason, item.message)
                        else:
                            self._push(item, block=sources.finite(src), stop=stop)
                    delay = 1.0
                    if sources.finite(src) and not src.loop:
                        return
                except sources.Unreachable as e:
                    self.metrics.sources.down(src.name)
                    self._bad(src.name, "unreachable", str(e))
                    stop.wait(delay)
                    delay = min(delay * 2, src.retry_max_seconds)
                except Exception as e:  # a decoder's surprise must not end the source: count, wait, reopen
                    self.metrics.sources.down(src.name)
                    self._bad(src.name, "error", f"{type(e).__name__}: {e}")
                    stop.wait(delay)
                    delay = min(delay * 2, src.retry_max_seconds)
        finally:
            with self.cond:
                self.sources_left -= 1
                self.cond.notify_all()

    def _bad(self, source: str, reason: str, message: str) -> None:
        self.metrics.bad.labels(source, reason).inc()
        log.warning("bad input; the pipeline goes on", extra={"source": source, "reason": reason,
                                                              "error": message[:300]})

    def _push(self, frame: sources.Frame, block: bool, stop: threading.Event) -> None:
        """Hand a frame to the model. A live source never waits: when the model falls behind, the oldest waiting
        frame is dropped and counted. A file or directory waits for room (nothing there is lost by waiting)."""
        self.metrics.frames.labels(frame.source).inc()
        with self.cond:
            while block and len(self.pending) >= self.config.max_pending_frames and not stop.is_set():
                self.cond.wait(0.1)
            if len(self.pending) >= self.config.max_pending_frames:
                old = self.pending.popleft()
                self.metrics.dropped.labels(old.source, "busy").inc()
            self.pending.append(frame)
            self.cond.notify_all()

    # ------------------------------------------------------------------ the model
    def _run_model(self, stop: threading.Event) -> None:
        while not stop.is_set():
            with self.cond:
                while not self.pending and not stop.is_set() and self.sources_left:
                    self.cond.wait(0.1)
                if not self.pending:
                    if not self.sources_left:
                        return
                    continue
                frame = self.pending.popleft()
                self.busy = True
                self.cond.notify_all()
            try:
                self._infer(frame)
            finally:
                with self.cond:
                    self.busy = False
                    self.cond.notify_all()

    def _infer(self, frame: sources.Frame) -> None:
        bound = self.model.transform
        assert bound is not None and bound.image is not None and bound.input is not None  # checked in __init__
        image = bound.image
        t0 = time.perf_counter()
        try:
            tensor = image.decode(frame.data) if frame.data is not None else image.from_image(frame.image)
        except ImageError as e:
            self._bad(frame.source, e.reason, str(e))
            return
        names = list(self.model.model_outputs)
        try:
            results = self.model.backend.run({bound.input: tensor[None]}, names)
        except Exception as e:  # the backend refused this frame: count it, keep going
            self._bad(frame.source, "inference_failed", f"{type(e).__name__}: {str(e)[:300]}")
            return
        results = bound.finish(results, [OUTPUT_INDICES, detect.OUTPUT_COUNT])
        self.metrics.inference.observe(time.perf_counter() - t0)
        body = orjson.dumps(self._record(frame, results), option=orjson.OPT_SERIALIZE_NUMPY)
        for w in self.workers:
            try:
                dropped = w.queue.put(body, frame.captured)
            except QueueFullItem as e:
                self._bad(frame.source, "too_large", str(e))
                continue
            if dropped:
                self.metrics.queue_dropped.labels(w.sink.name).inc(dropped)
            w.wake.set()
        self.processed += 1

    def _record(self, frame: sources.Frame, results: dict[str, np.ndarray]) -> dict:
        record = {"pipeline": self.config.name, "source": frame.source, "frame": frame.index,
                  "capturedAt": frame.captured, "model": self.model.name, "digest": self.model.digest}
        if detect.OUTPUT_COUNT in results:
            record["detections"] = _detections(results)
            return record
        if OUTPUT_INDICES in results:
            labels = results.get(OUTPUT_LABELS)
            record["top"] = [{"index": int(i), "score": float(s),
                              **({"label": labels[0][k].decode()} if labels is not None else {})}
                             for k, (i, s) in enumerate(zip(results[OUTPUT_INDICES][0], results[OUTPUT_SCORES][0],
                                                            strict=True))]
            return record
        record["outputs"] = {n: (a.tolist() if a.size <= MAX_RAW_OUTPUT_VALUES else {"shape": list(a.shape)})
                             for n, a in results.items() if n in self.model.model_outputs}
        return record

    # ------------------------------------------------------------------ the whole
    def run(self, stop: threading.Event, drain_seconds: float = 30.0) -> int:
        """Run until ``stop``, or until every source is finite and done and the queues are empty (at most
        ``drain_seconds`` after the last frame). 0 when everything was delivered."""
        sinks_stop = threading.Event()
        threads = [threading.Thread(target=self._run_source, args=(s, stop), name=f"source-{s.name}", daemon=True)
                   for s in self.config.sources]
        threads.append(threading.Thread(target=self._run_model, args=(stop,), name="model", daemon=True))
        senders = [threading.Thread(target=w.run, args=(sinks_stop,), name=f"sink-{w.sink.name}", daemon=True)
                   for w in self.workers]
        for t in threads + senders:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.2)
        deadline = time.monotonic() + drain_seconds
        while any(len(w.queue) for w in self.workers) and time.monotonic() < deadline and not stop.is_set():
            time.sleep(0.05)
        sinks_stop.set()
        for t in senders:
            t.join(10)
        left = sum(len(w.queue) for w in self.workers)
        for w in self.workers:
            w.queue.close()
        log.info("pipeline stopped", extra={"processed": self.processed, "undelivered": left})
        return 0 if left == 0 else 1
