"""The server's lifecycle: ``Server(config)`` composes the data plane and its listeners; ``load`` verifies and
loads the model, ``start`` opens the listeners, ``run_until`` serves (hot reload on --watch and SIGHUP) until
stopped, ``drain`` stops taking work and waits for what is in flight. ``cli`` owns signals and exit codes:
every start-up failure is a :class:`StartupError` carrying the documented exit code."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Protocol

from .app import App, ManagementApp, Metrics, ModelSlot
from .backends import ModelLoadError
from .budget import MemoryBudget
from .config import MonitoringOptions, ServeConfig
from .dataplane import DataPlane
from .digest import DigestError
from .exitcodes import EXIT_DECRYPT, EXIT_DIGEST, EXIT_LOAD, EXIT_SIGNATURE, EXIT_USAGE
from .management import Management, ManagementError
from .trust import Policy, TrustError

if TYPE_CHECKING:  # imported when monitoring (or --control-dir) is on
    from .control import Control
    from .feedback import Uploader
    from .monitor import Monitor

log = logging.getLogger("edgefleet_runtime")


class StartupError(Exception):
    """The server cannot start: ``code`` is the exit code (``exitcodes``), the message says why and what to do."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class Listener(Protocol):
    port: int

    def start(self) -> None: ...

    def shutdown(self, timeout: float) -> object: ...


class Server:
    def __init__(self, config: ServeConfig):
        self.config = config
        self.metrics = Metrics()
        self.monitor: Monitor | None = None
        self.management: Management | None = None
        self.uploader: Uploader | None = None
        self.listeners: list[Listener] = []
        self.slot: ModelSlot | None = None
        self.plane: DataPlane | None = None
        self.policy: Policy | None = None
        self.control: Control | None = None

    # ------------------------------------------------------------------ start-up
    def load(self) -> None:
        """Trust policy, monitoring, the model slot with the verified model, the management API and the uploader."""
        c = self.config
        try:
            t = c.trust
            policy = self.policy = Policy.from_files(t.public_keys, t.require_signature, t.decryption_key_file)
            self.monitor = monitor(c.monitoring, self.metrics)
        except ValueError as e:  # TrustError is a ValueError
            raise StartupError(EXIT_USAGE, str(e)) from None
        o = c.model_options
        slot = self.slot = ModelSlot(c.name, self.metrics, policy=policy, backend=o.backend, threads=o.threads,
                                     execution_provider=o.execution_provider, delegate=o.delegate,
                                     cache_dir=o.cache_dir, max_batch=o.max_batch, transform=c.transform,
                                     precision=o.precision)  # fmt: skip
        if c.management:
            try:
                self.management = _management(c, slot)
            except ManagementError as e:
                raise StartupError(EXIT_USAGE, str(e)) from None
        _load_model(slot, c.model, c.digest)
        slot.watch(c.model)
        try:
            self.uploader = _feedback(c.monitoring, self.monitor, slot, self.metrics, c.name)
        except ValueError as e:
            raise StartupError(EXIT_USAGE, str(e)) from None
        self.plane = DataPlane(slot, self.metrics, MemoryBudget(c.limits.body_budget_bytes), self.monitor)
        try:
            self.plane.control = self.control = _control(c, slot, self.metrics, policy)
        except ValueError as e:  # ControlError: an unusable control folder
            raise StartupError(EXIT_USAGE, str(e)) from None

    def start(self) -> None:
        """Open and start the listeners: REST, then the loopback management port and gRPC when asked for."""
        from .httpserver import HTTPServer

        c, plane = self.config, self._plane()
        slot = self._slot()
        app = App(slot, self.metrics, management=self.management if c.management_port is None else None,
                  plane=plane)
        refused = self.metrics.count_refused
        try:
            self.listeners = [HTTPServer(app, c.host, c.port, c.limits, refused, reuse_port=c.limits.workers > 1)]
            if c.management_port is not None and self.management is not None:
                self.listeners.append(HTTPServer(ManagementApp(app, self.management), "127.0.0.1", c.management_port,
                                                 c.limits, refused, budget=plane.budget))  # fmt: skip
            if c.grpc_port is not None:
                self.listeners.append(_grpc_server(c, plane))
        except (OSError, RuntimeError) as e:
            raise StartupError(EXIT_USAGE, f"cannot listen: {e}") from None
        for s in self.listeners:
            s.start()
        self.metrics.ready.set(1)
        current = slot.current
        log.info("listening", extra={
            "worker": c.worker, "host": c.host, "port": self.port, "grpc_port": c.grpc_port, "model": c.name,
            "digest": current.digest if current else None, "watch": c.watch,
            "management": "off" if self.management is None else ("port" if c.management_port else "token"),
        })  # fmt: skip

    @property
    def port(self) -> int:
        return self.listeners[0].port

    # ------------------------------------------------------------------ serving
    def run_until(self, stop: threading.Event, hup: threading.Event) -> None:
        """Serve until ``stop`` is set: poll the watched model (--watch), reload at once when ``hup`` is set."""
        slot = self._slot()
        interval = self.config.watch_interval if self.config.watch and self.control is None else 0.5
        while not stop.wait(interval):
            if hup.is_set():
                hup.clear()
                threading.Thread(target=slot.check_watch, kwargs={"force": True}, daemon=True).start()
            elif self.config.watch:
                slot.check_watch()
            if self.control is not None:
                self.control.poll()

    def drain(self) -> bool:
        """Report not ready, wait --shutdown-delay, then stop every listener (in-flight requests finish up to
        --drain-timeout); flush hard examples and stop the uploader. True when REST drained in time."""
        c, plane = self.config, self._plane()
        plane.draining = True
        self.metrics.ready.set(0)
        if c.shutdown_delay > 0:
            time.sleep(c.shutdown_delay)
        drained = bool(self.listeners[0].shutdown(c.drain_timeout)) if self.listeners else True
        for s in self.listeners[1:]:  # gRPC and the management port: in-flight calls finish, new ones are refused
            s.shutdown(c.drain_timeout)
        if self.monitor is not None and self.monitor.hard_examples is not None:
            self.monitor.hard_examples.flush()  # queued hard examples reach the disk before exit
        if self.uploader is not None:
            self.uploader.stop()
        return drained

    def _slot(self) -> ModelSlot:
        if self.slot is None:
            raise RuntimeError("Server.load() must run first")
        return self.slot

    def _plane(self) -> DataPlane:
        if self.plane is None:
            raise RuntimeError("Server.load() must run first")
        return self.plane


def _grpc_server(c: ServeConfig, plane: DataPlane) -> Listener:
    if c.grpc_server == "grpcio":
        from .grpcserver import GRPCServer

        return GRPCServer(plane, c.host, c.grpc_port or 0, c.limits)
    from .grpch2 import GRPCH2Server

    return GRPCH2Server(plane, c.host, c.grpc_port or 0, c.limits)


def _load_model(slot: ModelSlot, path: str, digest: str) -> None:
    try:
        slot.load(path, digest)
    except TrustError as e:
        code = EXIT_DECRYPT if e.reason in ("Encrypted", "BadDecryption") else EXIT_SIGNATURE
        raise StartupError(code, f"refusing to serve ({e.reason}): {e}") from None
    except DigestError as e:
        raise StartupError(EXIT_DIGEST, f"refusing to serve: {e}") from None
    except (ModelLoadError, OSError) as e:
        raise StartupError(EXIT_LOAD, f"cannot load model: {e}") from None


def monitor(m: MonitoringOptions, metrics: Metrics) -> Monitor | None:
    """The Monitor of the options, registered on the metrics registry; None when monitoring is off."""
    from .monitor import HardExamples, Monitor, read_reference

    if not m.enabled:
        return None
    reference = read_reference(m.drift_reference) if m.drift_reference else None
    spool = None
    if m.hard_examples_dir:
        spool = HardExamples(m.hard_examples_dir, m.hard_examples_sample_rate, m.hard_examples_max_count,
                             m.hard_examples_max_bytes, m.hard_examples_below)  # fmt: skip
    result = Monitor(m.output, m.uncertain_below, reference, m.drift_window, m.drift_threshold, spool)
    metrics.registry.register(result)
    return result


def _feedback(m: MonitoringOptions, monitor: Monitor | None, slot: ModelSlot, metrics: Metrics,
              name: str) -> Uploader | None:
    """The drift reference from --drift-eval (computed with the loaded model) and the hard-example uploader
    (started; None without --hard-examples-upload)."""
    from .feedback import Uploader, eval_reference

    current = slot.current
    if m.drift_eval and monitor is not None and current is not None:
        monitor.use_reference(eval_reference(current.backend, m.drift_eval, m.output))
    if not m.upload:
        return None
    if monitor is None or monitor.hard_examples is None:
        raise ValueError("--hard-examples-upload needs --hard-examples-dir: the spool it uploads from")
    meta = {"model": name, "model-digest": current.digest if current else "", "node": m.node_name,
            "class": m.runtime_class}
    uploader = Uploader(monitor.hard_examples, m.upload, meta, m.upload_batch, m.upload_interval, m.upload_insecure)
    metrics.registry.register(uploader)
    uploader.start()
    return uploader


def _control(c: ServeConfig, slot: ModelSlot, metrics: Metrics, policy: Policy) -> Control | None:
    """The control folder's poller (serve --control-dir), polled once; None when it is off."""
    if not c.control_dir:
        return None
    from .control import Control
    from .shadow import Shadow, ShadowMetrics

    shadow_metrics = ShadowMetrics(metrics.registry)
    o = c.model_options

    def candidate(path: str, digest: str, rate: float) -> Shadow:
        beside = ModelSlot(c.name, Metrics(), policy=policy, backend=o.backend, threads=o.threads,  # its own metrics
                           execution_provider=o.execution_provider, delegate=o.delegate, cache_dir=o.cache_dir,
                           max_batch=o.max_batch, precision=o.precision)  # fmt: skip
        return Shadow(beside.load(path, digest), rate, shadow_metrics)

    control = Control(c.control_dir, o.cache_dir or "", slot, metrics.registry, candidate,
                      {"policy": policy, "insecure": c.prefetch_insecure})
    control.poll()
    return control


def _management(c: ServeConfig, slot: ModelSlot) -> Management:
    from .management import read_token

    token = read_token(c.management_token_file) if c.management_token_file else None
    return Management(slot, token, c.management_token_file)
