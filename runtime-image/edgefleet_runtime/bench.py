"""``edgefleet-runtime bench``: measure a model and its candidates on this node, through ``serve``'s backends.

Each model is measured in a fresh child process (``multiprocessing`` spawn), so its peak RSS is its own
and a crashing or hanging candidate cannot take the others down. Per model:

- ``loadSeconds``: open + warm-up through ``backends.open_backend`` at 1 thread (what ``serve`` does)
- ``p50Ms1``/``p95Ms1`` and ``p50MsN``/``p95MsN``: one evaluation sample (batch 1 when the first dim is
  dynamic, else the model's fixed batch) at 1 and N intra-op threads, ``runs`` timed runs after 3 warm-ups
- ``throughputPerSecond``: samples per second running the whole evaluation set in batches at N threads
- ``peakRssBytes``: the child's high-water RSS (VmHWM: interpreter + runtime + model); ``rssBeforeLoadBytes``
  is the same child before the model was opened
- ``accuracy``: top-1 of the first output against the labels (``y``/``labels``/``label`` in the data);
  ``agreement``/``cosine``: the first output against the reference model's (``--model``)
- ``distribution``: predicted classes, confidence and input-mean bins on the evaluation data, the
  reference that ``serve --drift-reference`` compares live traffic with (``monitor``)

``fastest`` names the quickest error-free model at N threads (p50) whose accuracy drop against the
reference is within ``max_accuracy_drop`` (points) when that is given.
"""

from __future__ import annotations

import gc
import hashlib
import multiprocessing
import os
import platform
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .monitor import distribution

LABEL_KEYS = ("y", "labels", "label")
SKIP_SUFFIXES = (".sig", ".json", ".npz", ".npy", ".md", ".txt")
MAX_BATCH = 64
REPORT_MEDIA_TYPE = "application/vnd.edgefleet.bench-report+json"


class BenchError(ValueError):
    """Bad input to the benchmark; the message names the flag or file and the fix."""


@dataclass(frozen=True)
class Options:
    backend: str = "auto"
    execution_provider: str = "auto"
    delegate: str | None = None
    threads_n: int = 0  # 0 = os.cpu_count()
    runs: int = 100
    max_samples: int = 1000
    timeout_seconds: float = 600.0
    cache_dir: str | None = None  # the node cache: TensorRT engines built here are the ones serve reuses
    precision: str = "auto"

    @property
    def threads(self) -> int:
        return self.threads_n or max(1, os.cpu_count() or 1)


# ----------------------------------------------------------------------------- data
def load_eval(path: str | os.PathLike, max_samples: int) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """``.npz`` (keys = input names, labels under y/labels/label), ``.npy`` or a directory of ``.npy``."""
    p = Path(path)
    try:
        if p.is_dir():
            files = sorted(p.glob("*.npy"))
            if not files:
                raise BenchError(f"--eval {p}: the directory holds no .npy files; put one <input>.npy per input there")
            arrays = {f.stem: np.load(f, allow_pickle=False) for f in files}
        elif p.suffix == ".npy":
            arrays = {p.stem: np.load(p, allow_pickle=False)}
        else:
            with np.load(p, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
    except BenchError:
        raise
    except FileNotFoundError as e:
        raise BenchError(f"--eval {p}: no such file") from e
    except Exception as e:  # numpy raises several types for bad files
        raise BenchError(
            f"--eval {p}: not readable .npz/.npy data ({type(e).__name__}: {e}); "
            "save it with numpy.savez(path, <input name>=array, y=labels)"
        ) from e
    labels = None
    for k in LABEL_KEYS:
        if k in arrays:
            labels = np.asarray(arrays.pop(k)).reshape(-1)[:max_samples]
            break
    if not arrays:
        raise BenchError(f"--eval {p}: holds labels only; add one array per model input")
    return {k: v[:max_samples] for k, v in arrays.items()}, labels


def bind(arrays: dict[str, np.ndarray], inputs) -> dict[str, np.ndarray]:
    """The evaluation arrays by model input (``backends.TensorSpec``), checked for dtype and shape."""
    feeds = {}
    for spec in inputs:
        if spec.name in arrays:
            a = arrays[spec.name]
        elif len(inputs) == 1 and len(arrays) == 1:
            a = next(iter(arrays.values()))
        else:
            raise BenchError(
                f"--eval has no array for model input {spec.name!r} (it has {sorted(arrays)}); "
                f"save it with numpy.savez(path, {spec.name}=array)"
            )
        if a.dtype != spec.dtype:
            raise BenchError(
                f"--eval array for input {spec.name!r} is {a.dtype}, the model expects {spec.dtype}; "
                f"convert it with array.astype(numpy.{spec.dtype.name})"
            )
        dims = zip(spec.shape[1:], a.shape[1:], strict=False)
        ok = a.ndim == len(spec.shape) and all(w < 0 or w == g for w, g in dims)
        if not ok:
            raise BenchError(
                f"--eval array for input {spec.name!r} has shape {list(a.shape)}, the model expects "
                f"{list(spec.shape)} (-1 = any; first axis = samples)"
            )
        feeds[spec.name] = a
    counts = {a.shape[0] for a in feeds.values()}
    if len(counts) != 1 or 0 in counts:
        raise BenchError(f"--eval inputs need the same, non-zero number of samples; they have {sorted(counts)}")
    return feeds


def _batch_size(inputs) -> int | None:
    fixed = [s.shape[0] for s in inputs if s.shape and s.shape[0] >= 0]
    return min(fixed) if fixed else None


def _batches(feeds: dict[str, np.ndarray], size: int | None):
    n = next(iter(feeds.values())).shape[0]
    step = size or MAX_BATCH
    stop = n - n % step if size else n  # a fixed batch dim cannot take a short last batch
    for s in range(0, stop, step):
        yield {k: v[s : s + step] for k, v in feeds.items()}


# ----------------------------------------------------------------------------- one model (child process)
def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss() -> int:
    peak = _status_bytes("VmHWM")
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return peak


def _timed(backend, feed: dict, names: list[str], runs: int) -> tuple[float, float]:
    for _ in range(3):
        backend.run(feed, names)
    times = []
    for _ in range(max(runs, 1)):
        t0 = time.perf_counter()
        backend.run(feed, names)
        times.append((time.perf_counter() - t0) * 1000)
    p50, p95 = np.percentile(times, [50, 95])
    return round(float(p50), 4), round(float(p95), 4)


def _open(path: str, opts: Options, threads: int):
    from .app import _warmup
    from .backends import open_backend

    digest = _digest(Path(path)) if opts.cache_dir else None  # keys the TensorRT engine cache (trtcache)
    backend = open_backend(path, opts.backend, threads, opts.execution_provider, opts.delegate, digest=digest,
                           precision=opts.precision, cache_dir=opts.cache_dir)
    _warmup(backend)
    return backend


def _preimport(path: str, opts: Options) -> None:
    """Import the backend's library before the clock starts: loadSeconds and the RSS baseline are the model's."""
    from .backends import detect_format

    kind = opts.backend
    if kind == "auto":
        kind = {"tflite": "litert", "openvino-ir": "openvino", "openvino-zip": "openvino"}.get(
            detect_format(path), "onnxruntime")
    module = {"onnxruntime": "onnxruntime", "litert": "ai_edge_litert.interpreter", "openvino": "openvino"}[kind]
    try:
        __import__(module)
    except ImportError:
        pass  # open_backend names the missing library


def measure(path: str, arrays: dict[str, np.ndarray], opts: Options) -> dict:
    """Numbers for one model, in this process (``measure_isolated`` runs it in a child). One backend is open
    at a time, so the peak RSS is that of one serving session."""
    _preimport(path, opts)
    before = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    one = _open(path, opts, 1)
    load = time.perf_counter() - t0
    feeds = bind(arrays, one.inputs)
    names = [t.name for t in one.outputs]
    size = _batch_size(one.inputs)
    sample = {k: v[: size or 1] for k, v in feeds.items()}
    described = {"backend": one.name, **{k: v for k, v in one.describe().items()
                                         if k in ("execution_providers", "device", "delegate", "format",
                                                  "tensorrt")}}  # tensorrt: precision, GPU stack, engine cache
    p50_1, p95_1 = _timed(one, sample, names, opts.runs)
    if opts.threads == 1:
        many, (p50_n, p95_n) = one, (p50_1, p95_1)
    else:
        del one
        gc.collect()
        many = _open(path, opts, opts.threads)
        p50_n, p95_n = _timed(many, sample, names, opts.runs)
    firsts, samples = [], 0
    t0 = time.perf_counter()
    for batch in _batches(feeds, size):
        out = many.run(batch, names)
        firsts.append(np.asarray(out[names[0]]))
        samples += next(iter(batch.values())).shape[0]
    seconds = time.perf_counter() - t0
    output = np.concatenate(firsts, axis=0) if firsts else None
    first_input = next(iter(feeds.values()))[:samples]
    return {
        **described,
        "loadSeconds": round(load, 4),
        "p50Ms1": p50_1,
        "p95Ms1": p95_1,
        "threadsN": opts.threads,
        "p50MsN": p50_n,
        "p95MsN": p95_n,
        "throughputPerSecond": round(samples / seconds, 2) if seconds > 0 else None,
        "samples": samples,
        "rssBeforeLoadBytes": before,
        "peakRssBytes": _peak_rss(),
        "output": output,
        "distribution": None if output is None else distribution(output, first_input, names[0]),
    }


def _child(conn, path: str, arrays: dict, opts: Options) -> None:
    try:
        conn.send(("ok", measure(path, arrays, opts)))
    except BaseException as e:  # report anything, including the backends' private exception types
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def measure_isolated(path: str, arrays: dict[str, np.ndarray], opts: Options) -> dict:
    """``measure`` in a spawned child; {"error": ...} when it fails, crashes or exceeds the timeout."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, path, arrays, opts), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(opts.timeout_seconds):
            return {"error": f"no result within {opts.timeout_seconds:g} s (raise --timeout)"}
        kind, value = parent.recv()
    except EOFError:
        proc.join(5)
        return {"error": f"the measuring process died (exit code {proc.exitcode})"}
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(5)
        parent.close()
    return value if kind == "ok" else {"error": value}


# ----------------------------------------------------------------------------- the report
def candidate_files(directory: str | os.PathLike) -> list[Path]:
    """Model files in DIR and in DIR/sha256 (a compile ``--out`` or node cache), signatures and data skipped."""
    d = Path(directory)
    if not d.is_dir():
        raise BenchError(f"--candidates {d}: not a directory; pass the folder that holds the candidate files")
    found = []
    for folder in (d, d / "sha256"):
        if folder.is_dir():
            for f in sorted(folder.iterdir()):
                if f.is_file() and not f.name.startswith(".") and not f.name.endswith(SKIP_SUFFIXES):
                    found.append(f)
    if not found:
        raise BenchError(f"--candidates {d}: holds no model files (looked in {d} and {d / 'sha256'})")
    return found


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _compare(result: dict, ref_output, labels) -> None:
    out = result.pop("output", None)
    if out is None:
        return
    n = out.shape[0]
    classes = out.ndim == 2 and out.shape[1] > 1
    if labels is not None and classes and len(labels) >= n:
        result["accuracy"] = round(float((out.argmax(1) == labels[:n]).mean()), 6)
    if ref_output is not None and ref_output.shape == out.shape:
        r = ref_output.reshape(n, -1).astype(np.float64)
        g = out.reshape(n, -1).astype(np.float64)
        den = np.linalg.norm(r, axis=1) * np.linalg.norm(g, axis=1)
        cos = np.where(den > 0, (r * g).sum(1) / np.maximum(den, 1e-30), 1.0)
        result["cosine"] = round(float(cos.mean()), 6)
        if classes:
            result["agreement"] = round(float((ref_output.argmax(1) == out.argmax(1)).mean()), 6)


def _fastest(results: list[dict], max_accuracy_drop: float | None) -> str | None:
    ref = results[0].get("accuracy")
    ok = []
    for r in results:
        if "error" in r or r.get("p50MsN") is None:
            continue
        if max_accuracy_drop is not None and ref is not None and r.get("accuracy") is not None:
            r["accuracyDelta"] = round((r["accuracy"] - ref) * 100, 4)
            if -r["accuracyDelta"] > max_accuracy_drop:
                continue
        ok.append(r)
    return min(ok, key=lambda r: r["p50MsN"])["name"] if ok else None


def bench(
    model: str,
    eval_path: str,
    candidates: str | None = None,
    opts: Options | None = None,
    max_accuracy_drop: float | None = None,
) -> dict:
    """Measure ``model`` (the reference) and every file in ``candidates``; the report as a dict."""
    opts = opts or Options()
    if opts.runs < 1 or opts.max_samples < 1 or opts.threads_n < 0:
        raise BenchError("--runs and --max-samples must be at least 1 and --threads at least 0 (0 = all CPUs)")
    if not os.path.isfile(model):
        raise BenchError(f"--model {model}: no such file")
    arrays, labels = load_eval(eval_path, opts.max_samples)
    files = [Path(model)] + (candidate_files(candidates) if candidates else [])
    results, seen = [], set()
    for f in files:
        digest = _digest(f)
        if digest in seen:  # the reference is often one of the candidates too
            continue
        seen.add(digest)
        entry = {"name": f.name, "path": os.fspath(f), "digest": digest, "sizeBytes": f.stat().st_size}
        if _encrypted(f):
            entry["error"] = "encrypted variant: bench measures plaintext models; give it the decrypted file"
        else:
            entry.update(measure_isolated(os.fspath(f), arrays, opts))
        results.append(entry)
    ref_output = results[0].get("output")
    for r in results:
        _compare(r, ref_output, labels)
    return {
        "kind": "BenchReport",
        "node": os.environ.get("NODE_NAME") or socket.gethostname(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threadsN": opts.threads,
        "runs": opts.runs,
        "evaluation": {"path": os.fspath(eval_path), "labels": labels is not None},
        "reference": results[0]["name"],
        "results": results,
        "fastest": _fastest(results, max_accuracy_drop),
    }


def _encrypted(path: Path) -> bool:
    from .trust import MAGIC, is_encrypted

    with open(path, "rb") as f:
        return is_encrypted(f.read(len(MAGIC)))


REPORT_PUSH_SECONDS = 300.0  # the push, every request and retry together


def push_report(uri: str, data: bytes, insecure: bool = False) -> None:
    """Push ``data`` as a one-file artifact to ``oci://HOST[:PORT]/REPO:TAG`` (as the compile Job's report)."""
    import tempfile

    from .bounded import Deadline, Limits
    from .fetch import pusher_login, registry_client
    from .sealed import seal_from_env

    data = seal_from_env(data)  # the operator accepts only a report sealed with this Job's key
    rest = uri[len("oci://") :]
    registry, _, repo = rest.partition("/")
    if not repo or ":" not in repo.rsplit("/", 1)[-1]:
        raise BenchError(f"--report {uri}: an oci:// report needs a tag, oci://HOST:PORT/REPO:TAG")
    limits = Limits(max_bytes=0, deadline_seconds=REPORT_PUSH_SECONDS)
    client = registry_client(registry, insecure, limits, Deadline(limits.deadline_seconds), login=pusher_login())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "report.json"
        path.write_bytes(data)
        resp = client.push(
            target=rest, files=[f"{path}:{REPORT_MEDIA_TYPE}"], disable_path_validation=True, quiet=True
        )
    if getattr(resp, "status_code", 201) >= 300:
        raise OSError(f"push of the report to {rest} failed: HTTP {resp.status_code} {resp.text[:200]}")
