"""The inference application: model slot with atomic hot swap, OIP v2 routes, Prometheus metrics."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from . import __version__, trust
from .backends import Backend, ModelLoadError, TensorSpec, open_backend, read_model
from .budget import MemoryBudget
from .dataplane import Control, DataPlane
from .dataplane import LoadedModel as ServedModel
from .digest import DigestError, digest_from_cache_path, parse_digest
from .management import OFF_MESSAGE, Management
from .preprocess import Bound, Transform, TransformError
from .protocol import decode_image_request, decode_rest_request, encode_rest_response, header_int
from .tensors import MemoryRefused, RequestError

if TYPE_CHECKING:  # types only: monitor is imported when monitoring is on
    from .monitor import Monitor

log = logging.getLogger("edgefleet_runtime")

Headers = dict[str, str]  # lowercase name -> value
Body = bytes | bytearray
Reply = tuple[int, list[tuple[str, str]], bytes]  # status, headers, body
WatchTarget = tuple[str, int | None, int | None, int | None]  # real path, inode, mtime, size (None: missing)
JSON = [("Content-Type", "application/json")]
LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The server's Prometheus metrics. Under ``serve --workers N`` (PROMETHEUS_MULTIPROC_DIR set by the
    supervisor) every worker writes its values to files there and ``registry`` reads them all, so a scrape
    that reaches any worker sees the sums over workers (prometheus_client's multiprocess mode)."""

    def __init__(self) -> None:
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        r = CollectorRegistry(auto_describe=True)  # where the metrics live; scraped unless multiprocess
        self.registry = r if self.multiprocess_dir is None else _multiprocess_registry(self.multiprocess_dir)
        self.requests = Counter(
            "edgefleet_runtime_requests", "HTTP requests answered", ["endpoint", "code"], registry=r
        )
        self.errors = Counter("edgefleet_runtime_errors", "Requests answered with 4xx/5xx", ["code"], registry=r)
        self.latency = Histogram(
            "edgefleet_runtime_inference_seconds",
            "Infer request latency inside the server (decode + run + encode)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch = Histogram(
            "edgefleet_runtime_batch_size", "First dimension of the first input", buckets=BATCH_BUCKETS, registry=r
        )
        self.load_seconds = Gauge(
            "edgefleet_runtime_model_load_seconds",
            "Seconds the last model load took (verify + load + warmup)",
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.reloads = Counter("edgefleet_runtime_reloads", "Model (re)load attempts", ["result"], registry=r)
        self.info: Info | _ModelInfoGauge
        if self.multiprocess_dir is None:
            self.info = Info("edgefleet_runtime_model", "The model variant being served", registry=r)
        else:
            self.info = _ModelInfoGauge(r)
        self.ready = Gauge(
            "edgefleet_runtime_ready",
            "1 when a model is loaded and the server not draining (every worker)",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.refused = Counter(
            "edgefleet_runtime_refused",
            "Requests and connections refused or closed by a limit, by reason",
            ["reason"],
            registry=r,
        )
        self._children: dict[tuple[str, int], Counter] = {}

    def count_refused(self, reason: str) -> None:
        self.refused.labels(reason).inc()

    def count(self, endpoint: str, code: int) -> None:
        key = (endpoint, code)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.requests.labels(endpoint, str(code))
        child.inc()
        if code >= 400:
            self.errors.labels(str(code)).inc()


def _multiprocess_registry(path: str) -> CollectorRegistry:
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path)  # type: ignore[no-untyped-call]
    return registry


class _ModelInfoGauge:
    """``Info`` does not work across processes: under --workers the same sample
    (``edgefleet_runtime_model_info{name,digest,backend,path}``) is a gauge, 1 while some live worker serves
    that variant (the largest over workers), 0 once none does."""

    def __init__(self, registry: CollectorRegistry):
        self.gauge = Gauge(
            "edgefleet_runtime_model_info",
            "The model variant being served (1: served by a worker)",
            ["name", "digest", "backend", "path"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.labels: dict[str, str] | None = None

    def info(self, labels: dict[str, str]) -> None:
        if self.labels is not None and self.labels != labels:
            self.gauge.labels(**self.labels).set(0)
        self.labels = dict(labels)
        self.gauge.labels(**labels).set(1)


JSON_BYTES_PER_VALUE = 40  # "-0.00012345678901234567, " plus brackets and indentation
SMALL_BODY = 64 << 10  # headroom for the JSON around the tensors; also the limit of routes without tensors


def request_limit(inputs: list[TensorSpec], max_batch: int) -> int | None:
    """The largest infer body the model's inputs can need (JSON, at most ``max_batch`` along a dynamic
    first dimension); None when an input is BYTES or has another dynamic dimension (no bound)."""
    total = SMALL_BODY
    for t in inputs:
        if t.datatype == "BYTES" or any(d < 0 for d in t.shape[1:]):
            return None
        batch = (max_batch if t.shape[0] < 0 else t.shape[0]) if t.shape else 1
        total += math.prod(t.shape[1:]) * batch * max(JSON_BYTES_PER_VALUE, t.dtype.itemsize)
    return total


@dataclass
class LoadedModel:
    name: str
    version: str
    digest: str
    path: str
    backend: Backend
    load_seconds: float
    max_batch: int = 256
    transform: Bound | None = None  # the declared pre- and post-processing, checked against this model
    inputs: dict[str, TensorSpec] = field(init=False)
    model_outputs: dict[str, TensorSpec] = field(init=False)
    """What the backend computes."""
    outputs: dict[str, TensorSpec] = field(init=False)
    """What a client may ask for: the model's outputs and those of the declared post-processing."""
    encoded: dict[str, TensorSpec] = field(init=False)
    """Inputs that also take encoded images (BYTES): the one the declared image pre-processing feeds."""
    body_limit: int | None = field(init=False)
    metadata_json: bytes = field(init=False)

    def __post_init__(self) -> None:
        self.inputs = {t.name: t for t in self.backend.inputs}
        self.model_outputs = {t.name: t for t in self.backend.outputs}
        extra = self.transform.extra_outputs() if self.transform else []
        self.outputs = {**self.model_outputs, **{t.name: t for t in extra}}
        self.body_limit = request_limit(self.backend.inputs, self.max_batch)
        image = self.transform.image if self.transform else None
        self.encoded = {}
        if image is not None and self.transform and self.transform.input:
            self.encoded[self.transform.input] = TensorSpec(self.transform.input, "BYTES", (-1,))
            if self.body_limit is not None:  # the encoded images of one request: maxEncodedBytes in all
                self.body_limit = max(self.body_limit, SMALL_BODY + image.max_encoded_bytes)
        self.metadata_json = orjson.dumps(
            {
                "name": self.name,
                "versions": [self.version],
                "platform": self.backend.platform,
                "inputs": [t.metadata() for t in self.backend.inputs],
                "outputs": [t.metadata() for t in self.outputs.values()],
            }
        )


def _warmup(backend: Backend, transform: Transform | None = None) -> None:
    """One inference on zeros; the input an image transform feeds gets that transform's shape (a detector's
    dynamic height and width would not run at 1x1), other dynamic dimensions 1."""
    image = transform.image if transform is not None else None
    fed = (image.input or (backend.inputs[0].name if len(backend.inputs) == 1 else None)) if image else None
    feeds = {}
    for t in backend.inputs:
        if t.datatype == "BYTES":
            return
        shape = [d if d >= 0 else 1 for d in t.shape]
        if image is not None and t.name == fed and len(shape) == 4:
            shape = [shape[0], *(d if d >= 0 else w for d, w in zip(t.shape[1:], image.tensor_shape(), strict=True))]
        feeds[t.name] = np.zeros(shape, dtype=t.dtype)
    backend.run(feeds, [t.name for t in backend.outputs])


class ModelSlot:
    """Holds the served model. ``load`` verifies, loads and warms a new variant beside the current one
    and then swaps one reference: requests that already hold the old model finish on it."""

    def __init__(
        self,
        name: str,
        metrics: Metrics,
        *,
        backend: str = "auto",
        threads: int = 0,
        execution_provider: str = "auto",
        delegate: str | None = None,
        cache_dir: str | None = None,
        max_batch: int = 256,
        policy: trust.Policy | None = None,
        transform: Transform | None = None,
        precision: str = "auto",
    ):
        self.name = name
        self.transform = transform
        self.precision = precision  # TensorRT flags (trtcache); auto = the served model's own precision
        self.policy = policy or trust.Policy()
        self.metrics = metrics
        self.backend_kind = backend
        self.threads = threads
        self.execution_provider = execution_provider
        self.delegate = delegate
        self.cache_dir = cache_dir
        self.max_batch = max_batch
        self.current: LoadedModel | None = None
        self._lock = threading.Lock()
        self.watch_path: str | None = None
        self._watch_target: WatchTarget | None = None

    def load(self, path: str, digest: str) -> LoadedModel:
        with self._lock:
            t0 = time.perf_counter()
            try:
                digest, data, packaging = self._verified(path, digest)
                backend = open_backend(
                    path,
                    self.backend_kind,
                    self.threads,
                    self.execution_provider,
                    self.delegate,
                    digest=digest,
                    data=data,
                    packaging=packaging,
                    precision=self.precision,
                    cache_dir=self.cache_dir,
                )
                try:
                    _warmup(backend, self.transform)
                except Exception as e:
                    raise ModelLoadError(f"warm-up inference failed on {path}: {e}") from e
                bound = self._bind(backend)
            except (DigestError, trust.TrustError, ModelLoadError, OSError):
                self.metrics.reloads.labels("failed").inc()
                raise
            seconds = time.perf_counter() - t0
            model = LoadedModel(
                self.name, parse_digest(digest)[:12], digest, os.fspath(path), backend, seconds, self.max_batch, bound
            )
            previous = self.current
            self.current = model  # the atomic swap
            self.metrics.reloads.labels("loaded").inc()
            self.metrics.load_seconds.set(seconds)
            self.metrics.info.info({"name": self.name, "digest": digest, "backend": backend.name, "path": model.path})
            log.info(
                "model loaded",
                extra={
                    "model": self.name,
                    "digest": digest,
                    "path": model.path,
                    "backend": backend.name,
                    "load_seconds": round(seconds, 4),
                    "previous_digest": previous and previous.digest,
                    **backend.describe(),
                },
            )
            return model

    def _bind(self, backend: Backend) -> Bound | None:
        """The declared transform against this model's inputs and outputs; ModelLoadError naming the field."""
        if self.transform is None:
            return None
        if self.transform.image is not None:
            try:
                import PIL  # noqa: F401 - the image pre-processing needs Pillow (the runtime's `pipeline` extra)
            except ImportError:
                raise ModelLoadError("the model declares image pre-processing but Pillow is not installed; "
                                     "install edgefleet-runtime[pipeline]") from None
        try:
            return Bound.of(self.transform, backend.inputs, backend.outputs)
        except TransformError as e:
            raise ModelLoadError(f"the model's declared transform does not fit it: {e}") from None

    def _check_signature(self, path: str, digest: str) -> None:
        """The signature kept beside the blob (``<blob>.sig``) against the policy's keys."""
        if not self.policy.checks_signatures:
            return
        sig = trust.read_signature_file(trust.signature_path(os.path.realpath(path)))
        signer = self.policy.check(digest, sig, f"model {os.fspath(path)}")
        log.info("signature verified", extra={"model": self.name, "digest": digest, "key": signer})

    def _verified(self, path: str, digest: str) -> tuple[str, bytes, str]:
        """``(digest, model bytes, packaging)``: the file is read once, and those bytes are hashed, their signature
        checked and, when encrypted, decrypted in memory; what is loaded is what was verified (nothing reopens
        the path, which an attacker could swap in between)."""
        stored = read_model(path)
        want = "sha256:" + parse_digest(digest)
        got = "sha256:" + hashlib.sha256(stored).hexdigest()
        if got != want:
            raise DigestError(f"digest mismatch for {os.fspath(path)}: expected {want}, file has {got}")
        self._check_signature(path, want)
        if not trust.is_encrypted(stored[: len(trust.MAGIC)]):
            return want, stored, "file"
        if self.policy.decryption_key is None:
            raise trust.TrustError(
                "Encrypted", f"{os.fspath(path)} is encrypted; pass --decryption-key-file with the key of its Secret"
            )
        return want, trust.decrypt(stored, self.policy.decryption_key, f"model {os.fspath(path)}"), "encrypted"

    # ------------------------------------------------------------------ hot reload sources
    def watch(self, path: str) -> None:
        self.watch_path = path
        self._watch_target = self._target(path)

    @staticmethod
    def _target(path: str) -> WatchTarget:
        real = os.path.realpath(path)
        try:
            st = os.stat(real)
        except OSError:
            return (real, None, None, None)
        return (real, st.st_ino, st.st_mtime_ns, st.st_size)

    def check_watch(self, force: bool = False) -> bool:
        """Reload when the watched path now points at another file. Returns True if a swap happened."""
        if not self.watch_path:
            return False
        target = self._target(self.watch_path)
        if not force and target == self._watch_target:
            return False
        self._watch_target = target
        if target[1] is None:
            log.warning("watched model path is missing; keeping the current model", extra={"path": self.watch_path})
            return False
        digest = digest_from_cache_path(self.watch_path)
        if digest is None:
            log.error(
                "watched path changed but does not resolve into a content-addressed cache (…/sha256/<hex>); "
                "use the management API's load with a digest instead",
                extra={"path": self.watch_path, "target": target[0]},
            )
            self.metrics.reloads.labels("failed").inc()
            return False
        cur = self.current
        if cur is not None and cur.digest == digest:
            return False
        try:
            self.load(self.watch_path, digest)
            return True
        except (DigestError, trust.TrustError, ModelLoadError, OSError) as e:
            reason = getattr(e, "reason", type(e).__name__)
            log.error(
                "reload refused; keeping the current model",
                extra={"path": self.watch_path, "reason": reason, "error": str(e)},
            )
            return False


class App:
    """The REST adapter: OIP v2 routes over the data plane (``plane``), plus /metrics and the repository routes.
    ``slot``, ``metrics``, ``budget`` and ``monitor`` are the plane's, named here for the listeners."""

    def __init__(
        self,
        slot: ModelSlot,
        metrics: Metrics,
        server_name: str = "edgefleet-runtime",
        management: Management | None = None,
        monitor: Monitor | None = None,
        budget: MemoryBudget | None = None,
        plane: DataPlane | None = None,
    ):
        self.plane = plane or DataPlane(slot, metrics, budget, monitor)
        self.slot = slot
        self.budget = self.plane.budget  # the process's, shared by every listener (HTTPServer takes it)
        self.metrics = metrics
        self.monitor = monitor  # monitor.Monitor (serve --monitoring), or None: off
        self.management = management  # None: the repository routes are off on this port
        self.server_meta = orjson.dumps(
            {"name": server_name, "version": __version__, "extensions": ["binary_tensor_data", "model_repository"]}
        )
        self._ok = orjson.dumps({"live": True})
        self._infer_path = f"/v2/models/{slot.name}/infer"  # the usual route, matched before any splitting

    @property
    def control(self) -> Control | None:
        return self.plane.control

    @control.setter
    def control(self, value: Control | None) -> None:
        self.plane.control = value

    @property
    def draining(self) -> bool:
        return self.plane.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.plane.draining = value

    @property
    def ready(self) -> bool:
        return self.plane.ready

    def body_limit(self, method: str, path: str) -> int | None:
        """The HTTP server asks before reading a body: infer bodies as large as the model's inputs can need."""
        if path.endswith("/infer"):
            model = self.slot.current
            return model.body_limit if model is not None else SMALL_BODY
        return SMALL_BODY

    # The HTTP server calls this for every request.
    def __call__(self, method: str, path: str, headers: Headers, body: Body) -> Reply:
        if path == self._infer_path and method == "POST":
            try:
                return self._infer(self.slot.name, None, headers, body)
            except RequestError as e:
                return self._error("infer", e)
        path = path.split("?", 1)[0]
        parts = path.strip("/").split("/")
        endpoint = "other"
        try:
            if len(parts) >= 4 and parts[0] == "v2" and parts[1] == "models":
                name = parts[2]
                rest = parts[3:]
                version = None
                if len(rest) >= 2 and rest[0] == "versions":
                    version, rest = rest[1], rest[2:]
                if rest == ["infer"]:
                    endpoint = "infer"
                    self._method(method, "POST")
                    return self._infer(name, version, headers, body)
                endpoint = "model"
                model = self._model(name, version)
                self._method(method, "GET", "HEAD")
                if rest == ["ready"]:
                    return self._reply(
                        endpoint, 200 if self.ready else 503, orjson.dumps({"name": model.name, "ready": self.ready})
                    )
                if rest == []:
                    return self._reply(endpoint, 200, model.metadata_json)
            elif len(parts) == 3 and parts[:2] == ["v2", "models"]:
                endpoint = "model"
                self._method(method, "GET", "HEAD")
                return self._reply(endpoint, 200, self._model(parts[2], None).metadata_json)
            elif parts[:2] == ["v2", "health"] and len(parts) == 3:
                endpoint = "health"
                self._method(method, "GET", "HEAD")
                if parts[2] == "live":
                    return self._reply(endpoint, 200, self._ok)
                if parts[2] == "ready":
                    return self._reply(endpoint, 200 if self.ready else 503, orjson.dumps({"ready": self.ready}))
            elif parts == ["v2"]:
                endpoint = "server"
                self._method(method, "GET", "HEAD")
                return self._reply(endpoint, 200, self.server_meta)
            elif parts == ["metrics"]:
                self._method(method, "GET", "HEAD")
                self.metrics.ready.set(1 if self.ready else 0)
                out = generate_latest(self.metrics.registry)
                return 200, [("Content-Type", CONTENT_TYPE_LATEST)], out
            elif parts[:2] == ["v2", "repository"]:
                endpoint = "repository"
                return self._repository(method, parts[2:], headers, body)
            raise RequestError(404, f"no route for {method} {path}")
        except RequestError as e:
            return self._error(endpoint, e)

    def _error(self, endpoint: str, e: RequestError) -> Reply:
        if isinstance(e, MemoryRefused):
            self.metrics.count_refused("memory_budget")
        headers = JSON if e.status != 503 else [*JSON, ("Retry-After", "1")]
        return self._reply(endpoint, e.status, orjson.dumps({"error": e.message}), headers)

    def _reply(self, endpoint: str, status: int, body: bytes, headers: list[tuple[str, str]] = JSON) -> Reply:
        self.metrics.count(endpoint, status)
        return status, headers, body

    @staticmethod
    def _method(method: str, *allowed: str) -> None:
        if method not in allowed:
            raise RequestError(405, f"method {method} is not allowed here; use {' or '.join(allowed)}")

    def model(self, name: str, version: str | None) -> ServedModel:
        """The served model if ``name``/``version`` name it; RequestError 404 otherwise."""
        return self.plane.model(name, version)

    _model = model

    def _infer(self, name: str, version: str | None, headers: Headers, body: Body) -> Reply:
        t0 = time.perf_counter()
        model = self.plane.model(name, version)  # one reference for the whole request: safe across a swap
        hl = headers.get("inference-header-content-length")
        header_length = None if hl is None else header_int("Inference-Header-Content-Length", hl)
        enc = headers.get("content-encoding")
        if enc and enc.lower() != "identity":
            raise RequestError(415, f"Content-Encoding {enc!r} is not supported")
        content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        with self.plane.lease() as lease:
            if content_type.startswith("image/"):  # an encoded image for the declared pre-processing
                request = decode_image_request(body, content_type, model)
            else:
                request = decode_rest_request(body, header_length, model, lease)
            out, json_len = encode_rest_response(self.plane.infer(request, lease))
        self.metrics.latency.observe(time.perf_counter() - t0)
        if json_len is None:
            return self._reply("infer", 200, out)
        return self._reply(
            "infer",
            200,
            out,
            [("Content-Type", "application/octet-stream"), ("Inference-Header-Content-Length", str(json_len))],
        )

    def _repository(self, method: str, rest: list[str], headers: Headers, body: Body) -> Reply:
        if self.management is None:
            raise RequestError(404, OFF_MESSAGE)
        status, out_headers, out = self.management.handle(method, rest, headers, body)
        return self._reply("repository", status, out, out_headers)


class ManagementApp:
    """The app of the loopback-only management listener: the repository routes and nothing else."""

    def __init__(self, app: App, management: Management):
        self.app = app
        self.management = management

    def __call__(self, method: str, path: str, headers: Headers, body: Body) -> Reply:
        parts = path.split("?", 1)[0].strip("/").split("/")
        try:
            if parts[:2] != ["v2", "repository"]:
                raise RequestError(404, "the management port serves /v2/repository/... only")
            status, out_headers, out = self.management.handle(method, parts[2:], headers, body)
            return self.app._reply("repository", status, out, out_headers)
        except RequestError as e:
            return self.app._reply("repository", e.status, orjson.dumps({"error": e.message}))
