"""The pipeline's configuration (JSON, camelCase, as the operator renders EdgeDeployment.spec.pipeline), parsed
strictly: every refusal names the field and what to do."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
SOURCE_KINDS = ("directory", "file", "mjpeg", "video")


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Source:
    name: str
    kind: str  # directory | file | mjpeg | video
    url: str  # a path for directory/file; http(s):// for mjpeg; rtsp://, http(s):// or a path for video
    fps: float | None = None  # at most this many frames a second are taken (None: every frame)
    every: int = 1  # take one frame in `every`
    loop: bool = False  # directory/file: start again at the end
    timeout_seconds: float = 10.0  # connect and read deadline of network sources
    max_frame_bytes: int = 16 << 20  # an encoded frame (a file, an MJPEG part) larger than this is refused
    retry_max_seconds: float = 30.0  # the longest wait between reconnects of an unreachable stream


@dataclass(frozen=True)
class Mqtt:
    host: str
    port: int = 1883
    topic: str = "edgefleet/results"
    qos: int = 1
    client_id: str | None = None
    keepalive_seconds: int = 30
    timeout_seconds: float = 5.0


@dataclass(frozen=True)
class Webhook:
    url: str
    timeout_seconds: float = 5.0


@dataclass(frozen=True)
class Sink:
    name: str
    mqtt: Mqtt | None = None
    webhook: Webhook | None = None
    batch: int = 64  # results sent at once


@dataclass(frozen=True)
class QueueSettings:
    path: str = "/var/lib/edgefleet/pipeline"
    max_items: int = 100_000
    max_item_bytes: int = 256 << 10
    max_bytes: int | None = None  # results of one sink together (None: maxItems x maxItemBytes bounds it)


@dataclass(frozen=True)
class PipelineConfig:
    name: str
    sources: list[Source]
    sinks: list[Sink]
    queue: QueueSettings = field(default_factory=QueueSettings)
    max_pending_frames: int = 8  # frames waiting for the model; the oldest is dropped (and counted) beyond


def _get(d: dict, key: str, kind, where: str, default: Any = ..., low=None, high=None):
    if key not in d or d[key] is None:
        if default is ...:
            raise ConfigError(f"{where}.{key}: required")
        return default
    value = d[key]
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind:
        raise ConfigError(f"{where}.{key}: expected {kind.__name__}, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(f"{where}.{key}: {value} is outside [{low}, {high}]")
    return value


def _obj(d: Any, where: str, keys: set[str]) -> dict:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected an object")
    unknown = set(d) - keys
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(keys))}")
    return d


def _name(d: dict, where: str) -> str:
    name = _get(d, "name", str, where)
    if not NAME.match(name) or len(name) > 63:
        raise ConfigError(f"{where}.name: {name!r} is not a DNS label (lowercase letters, digits, '-')")
    return name


def _source(d: Any, where: str) -> Source:
    d = _obj(d, where, {"name", "kind", "url", "fps", "every", "loop", "timeoutSeconds", "maxFrameBytes",
                        "retryMaxSeconds"})
    kind = _get(d, "kind", str, where)
    if kind not in SOURCE_KINDS:
        raise ConfigError(f"{where}.kind: {kind!r} is not one of {', '.join(SOURCE_KINDS)}")
    url = _get(d, "url", str, where)
    if kind == "mjpeg" and not url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}.url: an mjpeg source needs an http:// or https:// URL")
    return Source(
        name=_name(d, where), kind=kind, url=url,
        fps=_get(d, "fps", float, where, None, 0.01, 1000.0),
        every=_get(d, "every", int, where, 1, 1, 1_000_000),
        loop=_get(d, "loop", bool, where, False),
        timeout_seconds=_get(d, "timeoutSeconds", float, where, 10.0, 0.1, 600.0),
        max_frame_bytes=_get(d, "maxFrameBytes", int, where, 16 << 20, 1024, 1 << 28),
        retry_max_seconds=_get(d, "retryMaxSeconds", float, where, 30.0, 0.1, 3600.0),
    )


def _sink(d: Any, where: str) -> Sink:
    d = _obj(d, where, {"name", "mqtt", "webhook", "batch"})
    mqtt = webhook = None
    if ("mqtt" in d) == ("webhook" in d):
        raise ConfigError(f"{where}: set exactly one of mqtt or webhook")
    if "mqtt" in d:
        m = _obj(d["mqtt"], f"{where}.mqtt", {"host", "port", "topic", "qos", "clientId", "keepaliveSeconds",
                                               "timeoutSeconds"})
        w = f"{where}.mqtt"
        mqtt = Mqtt(host=_get(m, "host", str, w), port=_get(m, "port", int, w, 1883, 1, 65535),
                    topic=_get(m, "topic", str, w, "edgefleet/results"), qos=_get(m, "qos", int, w, 1, 1, 2),
                    client_id=_get(m, "clientId", str, w, None),
                    keepalive_seconds=_get(m, "keepaliveSeconds", int, w, 30, 5, 3600),
                    timeout_seconds=_get(m, "timeoutSeconds", float, w, 5.0, 0.1, 120.0))
        if any(c in mqtt.topic for c in "+#") or not mqtt.topic:
            raise ConfigError(f"{w}.topic: a topic to publish to has no wildcards (+ or #)")
    else:
        h = _obj(d["webhook"], f"{where}.webhook", {"url", "timeoutSeconds"})
        w = f"{where}.webhook"
        webhook = Webhook(url=_get(h, "url", str, w), timeout_seconds=_get(h, "timeoutSeconds", float, w, 5.0, 0.1,
                                                                            120.0))
        if not webhook.url.startswith(("http://", "https://")):
            raise ConfigError(f"{w}.url: give an http:// or https:// URL")
    return Sink(name=_name(d, where), mqtt=mqtt, webhook=webhook, batch=_get(d, "batch", int, where, 64, 1, 1000))


def parse(text: str | bytes) -> PipelineConfig:
    try:
        d = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raise ConfigError(f"pipeline config: not JSON: {e}") from None
    d = _obj(d, "pipeline", {"name", "sources", "sinks", "queue", "maxPendingFrames"})
    sources, sinks = d.get("sources"), d.get("sinks")
    if not isinstance(sources, list) or not 1 <= len(sources) <= 16:
        raise ConfigError("pipeline.sources: give 1 to 16 sources")
    if not isinstance(sinks, list) or not 1 <= len(sinks) <= 8:
        raise ConfigError("pipeline.sinks: give 1 to 8 sinks")
    q = _obj(d.get("queue") or {}, "pipeline.queue", {"path", "maxItems", "maxItemBytes", "maxBytes"})
    config = PipelineConfig(
        name=_name(d, "pipeline"),
        sources=[_source(s, f"pipeline.sources[{i}]") for i, s in enumerate(sources)],
        sinks=[_sink(s, f"pipeline.sinks[{i}]") for i, s in enumerate(sinks)],
        queue=QueueSettings(path=_get(q, "path", str, "pipeline.queue", "/var/lib/edgefleet/pipeline"),
                            max_items=_get(q, "maxItems", int, "pipeline.queue", 100_000, 1, 10_000_000),
                            max_item_bytes=_get(q, "maxItemBytes", int, "pipeline.queue", 256 << 10, 1024, 16 << 20),
                            max_bytes=_get(q, "maxBytes", int, "pipeline.queue", None, 1 << 16, 1 << 40)),
        max_pending_frames=_get(d, "maxPendingFrames", int, "pipeline", 8, 1, 1024),
    )
    for what, names in (("sources", [s.name for s in config.sources]), ("sinks", [s.name for s in config.sinks])):
        if len(set(names)) != len(names):
            raise ConfigError(f"pipeline.{what}: names must be unique")
    return config
