"""``edgefleet-runtime pipeline``: load the model (digest and signature checked, as serve does), then run the
pipeline of --config until SIGTERM, or until its finite sources are done and their results delivered."""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger("edgefleet_runtime.pipeline")


def add_parser(sub, trust_arguments, transform_argument) -> None:
    p = sub.add_parser("pipeline", help="run frames from cameras, streams or files through the model and send the "
                       "results to MQTT or a webhook, with an on-disk queue for a lost uplink")
    p.add_argument("--config", help="the pipeline's JSON config file (docs/pipeline.md)")
    p.add_argument("--config-json", default=os.environ.get("EDGEFLEET_PIPELINE_CONFIG") or None,
                   help="the config as JSON text instead of a file")
    p.add_argument("--model", required=True, help="model file, or a cache pointer such as CACHE/current/NAME")
    p.add_argument("--digest", help="expected sha256:<hex> of the model bytes (or --model inside CACHE/sha256/)")
    p.add_argument("--name", default="model", help="the model's name in results")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads per inference (0 = backend default)")
    p.add_argument("--backend", default=os.environ.get("EDGEFLEET_BACKEND", "auto"))
    p.add_argument("--decryption-key-file", default=os.environ.get("EDGEFLEET_DECRYPTION_KEY_FILE") or None)
    p.add_argument("--metrics-host", default="0.0.0.0")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    p.add_argument("--drain-seconds", type=float, default=30.0,
                   help="after finite sources end: how long to wait for the sinks to take what is queued")
    trust_arguments(p)
    transform_argument(p)


def run(args, policy_of, transform_of, die) -> int:
    from ..app import Metrics, ModelSlot
    from ..backends import ModelLoadError
    from ..digest import DigestError, digest_from_cache_path
    from ..exitcodes import EXIT_LOAD, EXIT_USAGE
    from ..trust import TrustError
    from .config import ConfigError, parse
    from .diskqueue import FolderLock
    from .runner import Pipeline, PipelineMetrics

    try:
        if args.config_json:
            text = args.config_json
        elif args.config:
            with open(args.config, "rb") as f:
                text = f.read(1 << 20)
        else:
            raise ConfigError("give --config FILE or --config-json TEXT")
        config = parse(text)
        transform = transform_of(args)
        policy = policy_of(args)
    except (ConfigError, ValueError, OSError) as e:  # TransformError and TrustError are ValueErrors
        return die(EXIT_USAGE, str(e))
    digest = args.digest or digest_from_cache_path(args.model)
    if not digest:
        return die(EXIT_USAGE, "--digest is required unless --model resolves into CACHE/sha256/<hex>")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    lock = FolderLock(config.queue.path)
    try:
        os.makedirs(config.queue.path, exist_ok=True)
        if not lock.acquire(stop, lambda: log.info("another pipeline holds this queue (a rollout's other pod on "
                                                     "this node); waiting for it to end",
                                                     extra={"queue": config.queue.path})):
            return 0
    except OSError as e:
        return die(EXIT_LOAD, f"queue folder {config.queue.path}: {e.strerror or e}")
    slot = ModelSlot(args.name, Metrics(), backend=args.backend, threads=args.threads, policy=policy,
                     transform=transform)
    try:
        model = slot.load(args.model, digest)
        pipeline = Pipeline(config, model, PipelineMetrics())
    except (DigestError, TrustError, ModelLoadError, OSError, ValueError) as e:
        return die(EXIT_LOAD, f"cannot start the pipeline: {e}")
    if args.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, args.metrics_host, registry=pipeline.metrics.registry)
    log.info("pipeline started", extra={"pipeline": config.name, "model": args.name, "digest": model.digest,
                                        "sources": [s.name for s in config.sources],
                                        "sinks": [s.name for s in config.sinks]})
    return pipeline.run(stop, args.drain_seconds)
