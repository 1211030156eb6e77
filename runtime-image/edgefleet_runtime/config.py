"""The typed configuration of ``edgefleet-runtime serve``: built once from the parsed flags (``from_args``) and
passed to the ``Server``; nothing below it reads flags or the environment for its settings."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, replace

from .budget import DEFAULT_BYTES
from .preprocess import Transform


@dataclass(frozen=True)
class Limits:
    header_seconds: float = 10.0
    """Deadline for the request line and all headers, from the first byte."""
    body_seconds: float = 30.0
    """Deadline for the whole body, from the end of the headers."""
    idle_seconds: float = 75.0
    """Keep-alive: close a connection that sends nothing for this long."""
    write_seconds: float = 30.0
    """Deadline for sending one response (a client that does not read)."""
    max_connections: int = 256
    max_body_bytes: int = 32 << 20
    """No body is larger, whatever the route."""
    body_budget_bytes: int = DEFAULT_BYTES
    """All bodies in flight together (JSON counted JSON_EXPANSION times), and what decoding them takes: the
    process's memory budget (``budget.MemoryBudget``), shared with gRPC."""
    max_concurrency: int = max(16, 4 * (os.cpu_count() or 1))
    """Requests with a body in the app at once; more get 503 with Retry-After."""
    max_line_bytes: int = 8192
    max_header_bytes: int = 32768
    max_headers: int = 100
    workers: int = 1
    """Processes sharing the port (serve --workers); the caps above are this process's share."""

    def shared_by(self, workers: int) -> Limits:
        """This process's share when ``workers`` processes serve the port: the connection cap, the body budget
        and the concurrency cap divided (at least 1 each); per-request limits and deadlines stay."""
        return replace(
            self,
            workers=workers,
            max_connections=max(1, self.max_connections // workers),
            body_budget_bytes=max(1, self.body_budget_bytes // workers),
            max_concurrency=max(1, self.max_concurrency // workers),
        )


@dataclass(frozen=True)
class ModelOptions:
    """How the model slot opens variants (``ModelSlot``'s keywords)."""

    backend: str = "auto"
    threads: int = 0
    execution_provider: str = "auto"
    delegate: str | None = None
    cache_dir: str | None = None
    max_batch: int = 256
    precision: str = "auto"
    """TensorRT precision flags (``trtcache``); auto = the served model's own precision."""


@dataclass(frozen=True)
class TrustOptions:
    public_keys: tuple[str, ...] = ()
    require_signature: bool = False
    decryption_key_file: str | None = None


@dataclass(frozen=True)
class MonitoringOptions:
    """Fleet monitoring (``monitor``, ``feedback``); off unless ``enabled``."""

    monitoring: bool = False
    output: str | None = None
    uncertain_below: float = 0.5
    drift_reference: str | None = None
    drift_window: int = 1000
    drift_threshold: float = 0.2
    drift_eval: str | None = None
    hard_examples_dir: str | None = None
    hard_examples_sample_rate: float = 1.0
    hard_examples_max_count: int = 1000
    hard_examples_max_bytes: int = 64 << 20
    hard_examples_below: float | None = None
    upload: str | None = None
    upload_batch: int = 100
    upload_interval: float = 60.0
    upload_insecure: bool = False
    node_name: str = ""
    runtime_class: str = ""
    """The hardware class this pod serves (EDGEFLEET_RUNTIME_CLASS, set by the operator): recorded with uploads."""

    @property
    def enabled(self) -> bool:
        return bool(self.monitoring or self.hard_examples_dir or self.drift_reference or self.drift_eval)


@dataclass(frozen=True)
class ServeConfig:
    model: str
    digest: str
    name: str = "model"
    host: str = "0.0.0.0"
    port: int = 8080
    grpc_port: int | None = None
    grpc_server: str = "h2"
    """gRPC transport: ``h2`` (``grpch2``) or ``grpcio`` (``grpcserver.GRPCServer``)."""
    limits: Limits = Limits()
    model_options: ModelOptions = ModelOptions()
    transform: Transform | None = None
    """The model's declared pre- and post-processing (serve --transform), checked against the model at load."""
    trust: TrustOptions = TrustOptions()
    monitoring: MonitoringOptions = MonitoringOptions()
    watch: bool = False
    watch_interval: float = 2.0
    control_dir: str | None = None
    """The pod's control folder (``control.Control``: in-place switch, prefetch, shadow); None: off."""
    prefetch_insecure: bool = False
    """Prefetch (control folder) may use plain http to a non-loopback registry."""
    management_token_file: str | None = None
    management_port: int | None = None
    shutdown_delay: float = 0.0
    drain_timeout: float = 30.0
    workers: int = 1
    worker: int | None = None
    """This process's index under ``--workers N`` (None: the only process)."""

    @property
    def management(self) -> bool:
        return self.management_token_file is not None or self.management_port is not None

    @classmethod
    def from_args(cls, args: argparse.Namespace, digest: str, limits: Limits, worker: int | None,
                  transform: Transform | None = None) -> ServeConfig:
        """The config of ``serve``'s parsed flags (``digest``, ``limits`` and the parsed --transform already
        checked by the CLI). A worker of several gets its share of the limits, and only worker 0 serves gRPC."""
        if worker is not None:
            limits = limits.shared_by(args.workers)
        return cls(
            model=args.model, digest=digest, name=args.name, host=args.host, port=args.port,
            grpc_port=args.grpc_port if worker in (None, 0) else None, limits=limits,
            grpc_server=getattr(args, "grpc_server", "h2"),
            model_options=ModelOptions(args.backend, args.threads, args.execution_provider, args.delegate,
                                       args.cache, args.max_batch, args.precision),
            transform=transform,
            trust=TrustOptions(tuple(args.public_key), args.require_signature, args.decryption_key_file),
            monitoring=MonitoringOptions(
                args.monitoring, args.monitor_output, args.uncertain_below, args.drift_reference, args.drift_window,
                args.drift_threshold, args.drift_eval, args.hard_examples_dir, args.hard_examples_sample_rate,
                args.hard_examples_max_count, args.hard_examples_max_bytes, args.hard_examples_below,
                args.hard_examples_upload, args.hard_examples_batch, args.hard_examples_upload_interval,
                args.hard_examples_insecure, args.node_name, os.environ.get("EDGEFLEET_RUNTIME_CLASS", ""),
            ),
            watch=args.watch, watch_interval=args.watch_interval, control_dir=args.control_dir,
            prefetch_insecure=getattr(args, "prefetch_insecure", False),
            management_token_file=args.management_token_file,
            management_port=args.management_port, shutdown_delay=args.shutdown_delay,
            drain_timeout=args.drain_timeout, workers=args.workers, worker=worker,
        )  # fmt: skip
