"""``edgefleet-runtime``: ``serve`` a model over the Open Inference Protocol, ``fetch`` one into the cache, or
``bench`` models on this node."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import logs
from .backends import BACKENDS, EXECUTION_PROVIDERS
from .exitcodes import (  # noqa: F401 - re-exported: tests and callers read them here
    EXIT_DECRYPT,
    EXIT_DIGEST,
    EXIT_FETCH,
    EXIT_LOAD,
    EXIT_SIGNATURE,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
)
from .trtcache import PRECISIONS

if TYPE_CHECKING:
    from .config import Limits
    from .preprocess import Transform
    from .trust import Policy

log = logging.getLogger("edgefleet_runtime")


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgefleet-runtime", description=__doc__)
    p.add_argument("--log-level", default=os.environ.get("EDGEFLEET_LOG_LEVEL", "info"))
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve one model variant over KServe Open Inference Protocol v2 (REST)")
    s.add_argument("--model", required=True, help="model file, or a cache pointer such as CACHE/current/NAME")
    s.add_argument(
        "--digest",
        help="expected sha256:<hex> of the model bytes; may be omitted only when "
        "--model resolves into CACHE/sha256/<hex>",
    )
    s.add_argument("--name", default="model", help="model name in URLs (default: model)")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=_env_int("EDGEFLEET_PORT", 8080))
    s.add_argument(
        "--grpc-port",
        type=int,
        default=_env_int("EDGEFLEET_GRPC_PORT", 0) or None,
        help="also serve the Open Inference Protocol over gRPC (inference.GRPCInferenceService) on this port",
    )
    s.add_argument(
        "--grpc-server",
        choices=("h2", "grpcio"),
        default=os.environ.get("EDGEFLEET_GRPC_SERVER", "h2"),
        help="gRPC transport: h2 (default: unary HTTP/2 on the REST server's thread model, the fastest measured) "
        "or grpcio (grpcio's sync server)",
    )
    s.add_argument("--threads", type=int, default=0, help="intra-op threads per inference (0 = backend default)")
    s.add_argument(
        "--backend",
        choices=BACKENDS,
        default=os.environ.get("EDGEFLEET_BACKEND", "auto"),
        help="auto picks from the file: .tflite -> litert, OpenVINO IR -> openvino, else onnxruntime",
    )
    s.add_argument(
        "--execution-provider",
        choices=EXECUTION_PROVIDERS,
        default=os.environ.get("EDGEFLEET_EXECUTION_PROVIDER", "auto"),
        help="onnxruntime execution provider (auto = TensorRT/CUDA/OpenVINO when present, then CPU)",
    )
    s.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=os.environ.get("EDGEFLEET_PRECISION", "auto"),
        help="TensorRT precision flags (auto = the served model's: fp16 weights -> fp16, QDQ -> int8); with --cache, "
        "engines are cached under CACHE/tensorrt keyed by variant digest + TensorRT + CUDA + GPU",
    )
    s.add_argument(
        "--delegate",
        default=os.environ.get("EDGEFLEET_DELEGATE") or None,
        help="LiteRT external delegate library, e.g. libedgetpu.so.1",
    )
    _limit_arguments(s)
    _trust_arguments(s)
    s.add_argument(
        "--decryption-key-file",
        default=os.environ.get("EDGEFLEET_DECRYPTION_KEY_FILE") or None,
        help="32-byte key (raw, hex or base64) that unwraps encrypted variants' data keys; decrypted in memory",
    )
    s.add_argument(
        "--watch",
        action="store_true",
        help="poll --model (e.g. CACHE/current/NAME) and hot-swap when it points at a new blob",
    )
    s.add_argument("--watch-interval", type=float, default=2.0, help="seconds between --watch polls")
    s.add_argument(
        "--control-dir",
        default=os.environ.get("EDGEFLEET_CONTROL_DIR") or None,
        help="a folder (the pod's annotations through the downward API) with `active` (digest to switch to in "
        "place), `prefetch` and `shadow` (JSON): read every 0.5 s (edgefleet_runtime.control); needs --cache",
    )
    s.add_argument("--prefetch-insecure", action="store_true",
                   help="with --control-dir: plain http to a non-loopback registry for prefetch")
    s.add_argument("--cache", help="node cache dir (CACHE/sha256/<hex>): the only place the management API loads from")
    s.add_argument(
        "--management-token-file",
        default=os.environ.get("EDGEFLEET_MANAGEMENT_TOKEN_FILE") or None,
        help="turn the management API (/v2/repository/...) on, on the serving port, for requests with "
        "Authorization: Bearer <the token in this file>; needs --cache",
    )
    s.add_argument(
        "--management-port",
        type=int,
        default=None,
        help="turn the management API on, on a separate listener bound to 127.0.0.1 (also needs the token "
        "when --management-token-file is given); needs --cache",
    )
    s.add_argument(
        "--shutdown-delay",
        type=float,
        default=0.0,
        help="on SIGTERM, report not-ready but keep serving this many seconds before draining",
    )
    s.add_argument(
        "--drain-timeout", type=float, default=30.0, help="seconds to wait for in-flight requests after SIGTERM"
    )
    s.add_argument(
        "--workers",
        type=int,
        default=_env_int("EDGEFLEET_WORKERS", 1),
        help="processes serving the port (SO_REUSEPORT), each with its own copy of the model; the connection "
        "cap, body budget and concurrency cap are divided among them; gRPC runs in one; not with the "
        "management API or monitoring",
    )
    s.add_argument(
        "--metrics-dir",
        default=os.environ.get("EDGEFLEET_METRICS_DIR") or None,
        help="with --workers > 1: the directory where workers share their metrics (emptied at start; default: "
        "a new temporary directory; give a writable volume such as an emptyDir under a read-only root)",
    )
    _monitoring_arguments(s)
    _transform_argument(s)

    from .pipeline.cli import add_parser as pipeline_parser

    pipeline_parser(sub, _trust_arguments, _transform_argument)

    f = sub.add_parser("fetch", help="pull and verify an artifact into the node-local cache (init container)")
    f.add_argument("--ref", required=True, help="oci://host/repo@sha256:..., file:///path or https://...")
    f.add_argument("--digest", required=True, help="sha256:<hex> of the model bytes")
    f.add_argument("--cache", required=True, help="cache dir; the blob lands in DIR/sha256/<hex>")
    f.add_argument("--name", help="also point DIR/current/NAME at the blob")
    f.add_argument("--insecure", action="store_true", help="allow plain http to a non-loopback registry")
    f.add_argument("--delta", action="append", default=[], metavar="base=sha256:..,digest=sha256:..,ref=REF",
                   help="a delta to this variant from the variant `base`: used when the cache holds `base`, the "
                   "result verified like a full download, the full variant fetched on any failure (repeatable)")
    _trust_arguments(f)

    c = sub.add_parser("prepare-cache", help="create the node cache's folders and hand them to the runtime user "
                       "(init container running as root with CHOWN; the images have no shell)")
    c.add_argument("--cache", required=True, help="the node cache (a hostPath volume)")
    c.add_argument("--uid", type=int, default=10001, help="user (and group) that fetch and serve run as")
    c.add_argument("--spool", action="append", default=[],
                   help="also create this folder under the cache (relative: a hard-example spool, a pipeline's "
                   "queue; repeatable)")
    d = sub.add_parser("cache-driver", help="the node cache's CSI driver (cache.edgefleet.io): each namespace's "
                       "pods get their own folder of the cache (a DaemonSet in the operator's namespace)")
    d.add_argument("--root", default="/var/lib/edgefleet/cache", help="the node cache on the host")
    d.add_argument("--uid", type=int, default=10001, help="user (and group) the runtime pods run as")
    d.add_argument("--node", default=os.environ.get("NODE_NAME", ""), help="this node's name (NODE_NAME)")
    d.add_argument("--csi-socket", default="/var/lib/kubelet/plugins/cache.edgefleet.io/csi.sock")
    d.add_argument("--registration-socket",
                   default="/var/lib/kubelet/plugins_registry/cache.edgefleet.io-reg.sock")
    _bench_arguments(sub)
    return p


def _bench_arguments(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    b = sub.add_parser("bench", help="measure a model (and candidates) on this node with serve's backends; JSON out")
    b.add_argument("--model", required=True, help="the reference model file (accuracy and agreement are against it)")
    b.add_argument("--eval", required=True, help="evaluation data: .npz (input -> array, labels as y), .npy or dir")
    b.add_argument("--candidates", help="folder of candidate model files (also DIR/sha256/<hex>, a compile --out)")
    b.add_argument("--threads", type=int, default=0, help="N for the N-thread numbers (0 = all CPUs)")
    b.add_argument("--runs", type=int, default=100, help="timed runs per latency figure")
    b.add_argument("--max-samples", type=int, default=1000, help="evaluation samples used at most")
    b.add_argument("--max-accuracy-drop", type=float, help="points of top-1 a candidate may lose to be 'fastest'")
    b.add_argument("--timeout", type=float, default=600.0, help="seconds per model before it counts as failed")
    b.add_argument("--backend", choices=BACKENDS, default=os.environ.get("EDGEFLEET_BACKEND", "auto"))
    b.add_argument(
        "--execution-provider", choices=EXECUTION_PROVIDERS,
        default=os.environ.get("EDGEFLEET_EXECUTION_PROVIDER", "auto"),
    )
    b.add_argument("--delegate", default=os.environ.get("EDGEFLEET_DELEGATE") or None)
    b.add_argument("--cache", help="the node cache: TensorRT engines are built into CACHE/tensorrt, where serve "
                   "--cache finds them (keyed by model digest + TensorRT + CUDA + GPU)")
    b.add_argument("--precision", choices=PRECISIONS, default=os.environ.get("EDGEFLEET_PRECISION", "auto"),
                   help="TensorRT precision flags (auto = each model's own)")
    b.add_argument("--out", help="write the JSON report to this file (default: stdout)")
    b.add_argument("--report", help="also push the JSON report to oci://HOST:PORT/REPO:TAG (the bench Job)")
    b.add_argument("--insecure", action="store_true", help="plain http to the --report registry")


def _transform_argument(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--transform",
        default=os.environ.get("EDGEFLEET_TRANSFORM") or None,
        help="the model's declared pre- and post-processing as JSON, e.g. '{\"preprocessing\": {\"image\": "
        "{\"width\": 224, \"height\": 224}}, \"postprocessing\": {\"topK\": 5}}' (the operator renders it "
        "from the EdgeModel); encoded images (JPEG/PNG) are then accepted",
    )


def _transform(args: argparse.Namespace) -> Transform | None:
    """The parsed --transform, or None; ValueError (TransformError) naming the field."""
    if not args.transform:
        return None
    from .preprocess import Transform

    return Transform.from_json(args.transform)


def _monitoring_arguments(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group("fleet monitoring (edgefleet_runtime.monitor; off by default)")
    g.add_argument("--monitoring", action="store_true", help="export prediction confidence, class counts and drift")
    g.add_argument("--monitor-output", help="the [batch, classes] output to watch (default: the model's first)")
    g.add_argument("--uncertain-below", type=float, default=0.5, help="confidence under which a prediction is unsure")
    g.add_argument("--drift-reference", help="bench report (or its distribution) of the evaluation data: turns on PSI")
    g.add_argument("--drift-window", type=int, default=1000, help="predictions compared with the reference")
    g.add_argument("--drift-threshold", type=float, default=0.2, help="PSI at which edgefleet_runtime_drifting is 1")
    g.add_argument("--hard-examples-dir", help="spool unsure inputs and outputs here (.npz; implies --monitoring)")
    g.add_argument("--hard-examples-sample-rate", type=float, default=1.0, help="share of unsure predictions kept")
    g.add_argument("--hard-examples-max-count", type=int, default=1000, help="files the spool may hold")
    g.add_argument("--hard-examples-max-bytes", type=int, default=64 << 20, help="bytes the spool may hold")
    g.add_argument("--hard-examples-below", type=float,
                   help="spool predictions under this confidence (default: --uncertain-below)")
    g.add_argument("--drift-eval", help="evaluation data (.npz keyed by input name): the served model's answers on it"
                   " become the drift reference (turns on PSI)")
    g.add_argument("--hard-examples-upload", metavar="oci://HOST[:PORT]/REPO",
                   help="push the spool's examples there in batches (one OCI artifact each)")
    g.add_argument("--hard-examples-batch", type=int, default=100, help="examples per uploaded artifact at most")
    g.add_argument("--hard-examples-upload-interval", type=float, default=60.0, help="seconds between uploads")
    g.add_argument("--hard-examples-insecure", action="store_true", help="plain http to the upload registry")
    g.add_argument("--node-name", default=os.environ.get("NODE_NAME", ""), help="recorded with uploads ($NODE_NAME)")


def _trust_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("trust (signed variants: edgefleet_runtime.trust)")
    g.add_argument(
        "--public-key",
        action="append",
        default=[],
        metavar="FILE",
        help="trusted ECDSA P-256 public key (PEM; repeatable); a variant's signature must verify with one of them",
    )
    g.add_argument(
        "--require-signature",
        action="store_true",
        help="refuse variants without a signature (without it only a present signature is checked)",
    )


def _policy(args: argparse.Namespace) -> Policy:
    """The trust policy of the flags; TrustError when a key file is unusable."""
    from .trust import Policy

    return Policy.from_files(args.public_key, args.require_signature, getattr(args, "decryption_key_file", None))


def _limit_arguments(s: argparse.ArgumentParser) -> None:
    """Limits against slow, large and many clients; the defaults fit a 1 GiB pod."""
    from .config import Limits

    d = Limits()
    g = s.add_argument_group("limits (defaults fit a 1 GiB pod)")
    g.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="largest request body, any route")
    g.add_argument(
        "--max-batch",
        type=int,
        default=256,
        help="largest batch (dynamic first dimension) an infer body may carry: bodies larger than the model's "
        "inputs can need at this batch are refused (413) before they are read",
    )
    g.add_argument(
        "--body-budget-bytes",
        type=int,
        default=d.body_budget_bytes,
        help="the memory budget of all requests in flight together, REST and gRPC: bodies and messages (JSON counted "
        "24x for parsing) and what decoding them takes (BYTES tensors); beyond it 503 + Retry-After "
        "(gRPC: RESOURCE_EXHAUSTED)",
    )
    g.add_argument("--max-connections", type=int, default=d.max_connections)
    g.add_argument(
        "--max-concurrency",
        type=int,
        default=d.max_concurrency,
        help="requests with a body in the server at once (REST and gRPC each); beyond it 503 + Retry-After",
    )
    g.add_argument("--header-timeout", type=float, default=d.header_seconds, help="seconds for the whole head")
    g.add_argument("--body-timeout", type=float, default=d.body_seconds, help="seconds for the whole body")
    g.add_argument("--idle-timeout", type=float, default=d.idle_seconds, help="keep-alive idle seconds")


# Limits field -> the flag's dest
LIMIT_FLAGS = {
    "header_seconds": "header_timeout", "body_seconds": "body_timeout", "idle_seconds": "idle_timeout",
    "max_connections": "max_connections", "max_body_bytes": "max_body_bytes",
    "body_budget_bytes": "body_budget_bytes", "max_concurrency": "max_concurrency",
}
def _from_args(args: argparse.Namespace, flags: dict[str, str]) -> dict[str, Any]:
    """Keyword arguments from the parsed flags: keyword -> getattr(args, dest)."""
    return {keyword: getattr(args, dest) for keyword, dest in flags.items()}


def _limits(args: argparse.Namespace) -> Limits:
    from .config import Limits

    for name in ("max_body_bytes", "max_batch", "body_budget_bytes", "max_connections", "max_concurrency"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("header_timeout", "body_timeout", "idle_timeout"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive number of seconds")
    return Limits(**_from_args(args, LIMIT_FLAGS))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    logs.setup(args.log_level)
    if args.command == "fetch":
        return _fetch(args)
    if args.command == "prepare-cache":
        return _prepare_cache(args.cache, args.uid, args.spool)
    if args.command == "bench":
        return _bench(args)
    if args.command == "pipeline":
        from .pipeline.cli import run as run_pipeline

        return run_pipeline(args, _policy, _transform, _die)
    if args.command == "cache-driver":
        from .cachedriver import run

        return run(args.root, args.uid, args.node, args.csi_socket, args.registration_socket)
    return _serve(args, argv)


def _prepare_cache(cache: str, uid: int, spools: list[str] | None = None) -> int:
    """mkdir -p cache/{sha256,tmp,current,SPOOL...} and chown -R uid:uid cache, without following symlinks."""
    root = Path(cache)
    spools = spools or []
    for spool in spools:
        if Path(spool).is_absolute() or ".." in Path(spool).parts:
            return _fail("prepare-cache", EXIT_USAGE, f"--spool {spool}: give a path inside the cache, without '..'")
    # without DAC_OVERRIDE this container may not create folders in ones it does not own: own the way to each
    # spool while making it (a moment; the walk below hands everything back)
    chain = list(dict.fromkeys([root, *(root.joinpath(*Path(spool).parts[:i]) for spool in spools
                                        for i in range(1, len(Path(spool).parts)))]))
    for part in chain:
        if part.is_dir() and not part.is_symlink():
            os.chown(part, os.getuid(), os.getgid(), follow_symlinks=False)
    for sub in ("sha256", "tmp", "current", *spools):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for part in chain:
        os.chown(part, uid, uid, follow_symlinks=False)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            os.chown(os.path.join(dirpath, name), uid, uid, follow_symlinks=False)
    os.chown(root, uid, uid)
    return 0


def _termination_message(text: str) -> None:
    """Kubernetes shows a container's termination message in its status (and the operator in the class's
    message): write it where the kubelet mounted the file; nothing outside a pod."""
    path = os.environ.get("EDGEFLEET_TERMINATION_LOG", "/dev/termination-log")
    if not os.path.isfile(path):
        return
    try:
        with open(path, "w") as f:
            f.write(text[:4000])
    except OSError:
        pass


def _fail(command: str, code: int, text: str) -> int:
    print(f"edgefleet-runtime {command}: {text}", file=sys.stderr)
    _termination_message(text)
    return code


def _fetch(args: argparse.Namespace) -> int:
    from .digest import DigestError
    from .fetch import DeltaSource, FetchError, RegistryUnreachable, fetch
    from .trust import TrustError

    try:
        policy = _policy(args)
        deltas = [DeltaSource.parse(text) for text in args.delta]
    except ValueError as e:  # TrustError and DigestError are ValueErrors
        return _fail("fetch", EXIT_USAGE, str(e))
    try:
        path = fetch(args.ref, args.digest, args.cache, name=args.name, insecure=args.insecure, policy=policy,
                     deltas=deltas)
    except TrustError as e:
        log.error("fetch refused", extra={"reason": e.reason, "error": str(e)})
        return _fail("fetch", EXIT_SIGNATURE, f"refused ({e.reason}): {e}")
    except DigestError as e:
        log.error("fetch refused", extra={"error": str(e)})
        return _fail("fetch", EXIT_DIGEST, str(e))
    except RegistryUnreachable as e:
        log.error("fetch failed: registry unreachable", extra={"error": str(e)})
        return _fail("fetch", EXIT_UNREACHABLE, str(e))
    except (FetchError, OSError) as e:
        log.error("fetch failed", extra={"error": str(e)})
        return _fail("fetch", EXIT_FETCH, str(e))
    print(path)
    return 0


def _bench(args: argparse.Namespace) -> int:
    """Exit 0: every model measured; 1: some candidate failed (named in the report); 2: bad input;
    4: the reference model failed; 5: the report could not be pushed."""
    import json

    from .bench import BenchError, Options, bench, push_report

    opts = Options(
        backend=args.backend, execution_provider=args.execution_provider, delegate=args.delegate,
        threads_n=args.threads, runs=args.runs, max_samples=args.max_samples, timeout_seconds=args.timeout,
        cache_dir=args.cache, precision=args.precision,
    )
    try:
        report = bench(args.model, args.eval, args.candidates, opts, args.max_accuracy_drop)
    except BenchError as e:
        print(f"edgefleet-runtime bench: {e}", file=sys.stderr)
        return EXIT_USAGE
    text = json.dumps(report, indent=1, sort_keys=True)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    if args.report:
        try:
            push_report(args.report, text.encode(), insecure=args.insecure)
        except (BenchError, OSError, ValueError) as e:
            print(f"edgefleet-runtime bench: {e}", file=sys.stderr)
            return EXIT_FETCH
    errors = [r for r in report["results"] if "error" in r]
    for r in errors:
        print(f"edgefleet-runtime bench: {r['name']}: {r['error']}", file=sys.stderr)
    if errors and errors[0] is report["results"][0]:  # the reference: bad data (BenchError) or load failure
        return EXIT_USAGE if errors[0]["error"].startswith("BenchError") else EXIT_LOAD
    return 1 if errors else 0


def _die(code: int, msg: str) -> int:
    log.error(msg)
    return _fail("serve", code, msg)


def _serve(args: argparse.Namespace, argv: list[str]) -> int:
    """Checks that need no model, then a supervisor (--workers N > 1) or the server itself."""
    from .digest import digest_from_cache_path
    from .workers import refusal, supervise, worker_index

    refused = refusal(args)
    if refused:
        return _die(EXIT_USAGE, refused)
    if not os.path.exists(args.model):
        return _die(EXIT_USAGE, f"--model {args.model}: no such file")
    digest = args.digest or digest_from_cache_path(args.model)
    if not digest:
        return _die(EXIT_USAGE, "--digest is required unless --model resolves into CACHE/sha256/<hex>")
    try:
        limits = _limits(args)
    except ValueError as e:
        return _die(EXIT_USAGE, str(e))
    if args.control_dir and not args.cache:
        return _die(EXIT_USAGE, "--control-dir needs --cache: activation, prefetch and shadow use cached variants")
    if args.control_dir and args.workers > 1:
        return _die(EXIT_USAGE, f"--workers {args.workers} cannot be combined with --control-dir: a switch would "
                    "reach one worker only; serve with --workers 1")
    if args.workers > 1 and worker_index() is None:
        return supervise(args, argv)  # before the model's imports: the supervisor stays small
    return _serve_model(args, digest, limits, worker_index())


def _serve_model(args: argparse.Namespace, digest: str, limits: Limits, worker: int | None) -> int:
    """One serving process: the typed config of the flags, then the Server's lifecycle under this process's
    signals (SIGHUP: reload the watched model now; SIGTERM/SIGINT: drain and exit)."""
    hup = threading.Event()  # a SIGHUP while the model loads is kept for the loop below, not fatal
    signal.signal(signal.SIGHUP, lambda _signum, _frame: hup.set())
    from .config import ServeConfig
    from .server import Server, StartupError
    from .workers import die_with_parent

    if worker is not None:
        die_with_parent()
    try:
        config = ServeConfig.from_args(args, digest, limits, worker, _transform(args))
    except ValueError as e:  # TransformError: --transform names the field
        return _die(EXIT_USAGE, str(e))
    server = Server(config)
    try:
        server.load()
        server.start()
    except StartupError as e:
        return _die(e.code, e.message)

    stop = threading.Event()

    def on_term(signum: int, _frame: object) -> None:
        log.info("signal received; shutting down", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    server.run_until(stop, hup)
    drained = server.drain()
    log.info("stopped", extra={"drained": drained})
    return 0 if drained else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
