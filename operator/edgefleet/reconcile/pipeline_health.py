"""Whether the pipelines of an EdgeDeployment (spec.pipeline) reach their sources and sinks.

Each pipeline container exports, on its /metrics (spec.pipeline.metricsPort), ``edgefleet_pipeline_source_up``
and ``..._sink_up`` (1 or 0) with ``..._down_seconds`` (how long it has failed), and the depth of each sink's
on-disk queue. The operator reads them from at most MAX_PODS_PER_CLASS Ready pods per hardware class, once per
READ_INTERVAL_SECONDS, with the same bounded scrape as drift (drift.scrape: no redirect, a size cap, a deadline).
A part down for DOWN_GRACE_SECONDS or longer (a broker restart is not a problem) makes the EdgeDeployment
Degraded, reason PipelineSourceUnreachable or PipelineSinkUnreachable, with the part's name, its URL from the
spec, the pods and nodes, and the fix. Nothing a pod wrote is quoted: only numbers are read from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from ..api import EdgeDeployment
from ..api.preprocessing import PipelineSink, PipelineSource, PipelineSpec
from .drift import PROFILE_LABEL, NotMetrics, Throttle, read_all, ready, scrape, why

READ_INTERVAL_SECONDS = 30.0
DOWN_GRACE_SECONDS = 20.0
MAX_PODS_PER_CLASS = 10
MAX_NAMED_PODS = 3  # pods named in one problem's message


@dataclass
class PodPipeline:
    """What one pipeline's /metrics said (or why it could not be read)."""

    pod: str
    node: str
    sources_down: dict[str, float] = field(default_factory=dict)  # name -> seconds down (0: up); absent: untried
    sinks_down: dict[str, float] = field(default_factory=dict)
    queued: dict[str, int] = field(default_factory=dict)  # sink -> results waiting on disk
    dropped: dict[str, int] = field(default_factory=dict)  # sink -> oldest dropped from a full queue
    error: str | None = None


def parse(text: str, into: PodPipeline) -> PodPipeline:
    """Fill ``into`` from a pipeline's /metrics text; NotMetrics when it is not Prometheus text."""
    up: dict[tuple[str, str], float] = {}
    down: dict[tuple[str, str], float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                part = "source" if "source" in s.labels else "sink"
                key = (part, s.labels.get(part, ""))
                if s.name in ("edgefleet_pipeline_source_up", "edgefleet_pipeline_sink_up"):
                    up[key] = s.value
                elif s.name in ("edgefleet_pipeline_source_down_seconds", "edgefleet_pipeline_sink_down_seconds"):
                    down[key] = s.value
                elif s.name == "edgefleet_pipeline_queue_depth":
                    into.queued[key[1]] = int(s.value)
                elif s.name == "edgefleet_pipeline_queue_dropped_total":
                    into.dropped[key[1]] = int(s.value)
    except (ValueError, TypeError, IndexError, KeyError) as e:
        raise NotMetrics() from e
    for (part, name), value in up.items():
        seconds = 0.0 if value >= 1 else max(down.get((part, name), 0.0), 0.0)
        (into.sources_down if part == "source" else into.sinks_down)[name] = seconds
    return into


def read_pods(pods: list[dict[str, Any]], ed: EdgeDeployment, fetch: Callable[[str, int], str] | None = None
              ) -> list[PodPipeline]:
    """The pipelines of the first MAX_PODS_PER_CLASS Ready pods (by name) of each class, read concurrently."""
    fetch = fetch or scrape
    spec = _spec(ed)
    chosen: list[dict[str, Any]] = []
    per_class: dict[str, int] = {}
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        profile = pod["metadata"].get("labels", {}).get(PROFILE_LABEL)
        if profile and ready(pod) and per_class.get(profile, 0) < MAX_PODS_PER_CLASS:
            per_class[profile] = per_class.get(profile, 0) + 1
            chosen.append(pod)

    def blank(pod: dict[str, Any], error: str | None = None) -> PodPipeline:
        return PodPipeline(pod["metadata"]["name"], pod["spec"].get("nodeName", ""), error=error)

    def one(pod: dict[str, Any]) -> PodPipeline:
        try:
            return parse(fetch(pod["status"]["podIP"], spec.metrics_port), blank(pod))
        except Exception as e:  # unreachable, refused, over a limit: this pod tells nothing this time
            return blank(pod, why(e)[:200])

    read = read_all(one, chosen, blank, "pipeline read")
    return [read[p["metadata"]["name"]] for p in chosen]


def _spec(ed: EdgeDeployment) -> PipelineSpec:
    if ed.spec.pipeline is None:
        raise ValueError(f"EdgeDeployment {ed.metadata.get('name')} has no spec.pipeline")
    return ed.spec.pipeline


def problem(ed: EdgeDeployment, read: list[PodPipeline]) -> tuple[str, str] | None:
    """(Degraded reason, message with the fix) when a source or sink has been down DOWN_GRACE_SECONDS or longer
    on some pod read; sources first (without frames, a sink has nothing to send)."""
    spec = _spec(ed)
    answered = [p for p in read if p.error is None]
    sources = [_source_line(i, s, down, len(answered))
               for i, s in enumerate(spec.sources) if (down := _down(answered, s.name, "sources_down"))]
    sinks = [_sink_line(i, s, down, len(answered))
             for i, s in enumerate(spec.sinks) if (down := _down(answered, s.name, "sinks_down"))]
    if sources:
        return "PipelineSourceUnreachable", "; ".join(sources + sinks)
    if sinks:
        return "PipelineSinkUnreachable", "; ".join(sinks)
    return None


def _down(read: list[PodPipeline], name: str, which: str) -> list[tuple[PodPipeline, float]]:
    """The pods on which part ``name`` has been down at least DOWN_GRACE_SECONDS, longest first."""
    hits = [(p, getattr(p, which)[name]) for p in read if getattr(p, which).get(name, 0.0) >= DOWN_GRACE_SECONDS]
    return sorted(hits, key=lambda h: -h[1])


def _where(down: list[tuple[PodPipeline, float]], answered: int) -> str:
    named = ", ".join(f"{p.pod} on {p.node or '?'}" for p, _ in down[:MAX_NAMED_PODS])
    more = f" and {len(down) - MAX_NAMED_PODS} more" if len(down) > MAX_NAMED_PODS else ""
    return f"for {DOWN_GRACE_SECONDS:g} s or more on {len(down)}/{answered} pods read ({named}{more})"


def _source_line(i: int, source: PipelineSource, down: list[tuple[PodPipeline, float]], answered: int) -> str:
    where = f"spec.pipeline.sources[{i}]"
    if source.kind in ("directory", "file"):
        fix = (f"the path {source.url!r} does not exist in the pipeline container or cannot be read: fix {where}.url "
               "or mount it on the class's nodes (HardwareProfile deviceMounts)")
    else:
        fix = (f"check {where}.url and that the stream is up and reachable from those nodes (address, port, "
               f"firewall, camera power); the pipeline reconnects by itself, backing off up to "
               f"{source.retry_max_seconds:g} s (retryMaxSeconds)")
    return (f"source {source.name!r} ({source.kind} {source.url}) unreachable {_where(down, answered)}. Fix: {fix}")


def _sink_line(i: int, sink: PipelineSink, down: list[tuple[PodPipeline, float]], answered: int) -> str:
    where = f"spec.pipeline.sinks[{i}]"
    if sink.mqtt is not None:
        target, fix = (f"mqtt {sink.mqtt.host}:{sink.mqtt.port}",
                       f"start the broker or fix {where}.mqtt.host and port, and the network from those nodes")
    else:
        assert sink.webhook is not None
        target, fix = (f"webhook {sink.webhook.url}",
                       f"make the endpoint answer 2xx or fix {where}.webhook.url, and the network from those nodes")
    queued = max((p.queued.get(sink.name, 0) for p, _ in down), default=0)
    dropped = sum(p.dropped.get(sink.name, 0) for p, _ in down)
    return (f"sink {sink.name!r} ({target}) unreachable {_where(down, answered)}; up to {queued} results wait in "
            f"a pod's on-disk queue (of queue.maxItems); {dropped} oldest dropped from full queues. Fix: {fix}; "
            "the queue is delivered in order once it is back")


THROTTLE = Throttle(interval=lambda ed: READ_INTERVAL_SECONDS)
