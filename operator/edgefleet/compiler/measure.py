"""Run a variant in its target runtime: load time, p50/p95 latency, agreement with the source."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .types import CompileError, Latency, Metrics


@dataclass
class InputSpec:
    name: str
    shape: list[int | None]  # None = dynamic
    dtype: Any


class Runner:
    inputs: list[InputSpec]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:  # pragma: no cover - interface
        raise NotImplementedError


class BackendRunner(Runner):
    """A candidate opened the way a node opens the variant it serves: through the runtime's backends
    (``edgefleet_runtime.backends``: format sniffing, gzip/zip unpacking and its size limit, LiteRT's int8
    inputs and outputs as FP32, OpenVINO's precision hint), so what is measured is what is served. The
    compiler has no GPU or accelerator, so ONNX Runtime runs on its CPU execution provider."""

    def __init__(self, data: bytes, runtime: str, threads: int = 1):
        from edgefleet_runtime.backends import ModelLoadError, open_backend

        with tempfile.NamedTemporaryFile(prefix="edgefleet-candidate-", delete=False) as f:
            f.write(data)
        try:  # the backends read the file while loading; an open mapping survives the unlink
            self.backend = open_backend(f.name, backend=runtime, threads=threads, execution_provider="cpu")
        except ModelLoadError as e:
            raise CompileError("RunFailed", f"the {runtime} runtime cannot load the model: {e}",
                               "check the model with the runtime (edgefleet-runtime serve --model FILE)") from e
        finally:
            os.unlink(f.name)
        self.inputs = [InputSpec(t.name, [d if d >= 0 else None for d in t.shape], t.dtype.type)
                       for t in self.backend.inputs]
        self._outputs = [t.name for t in self.backend.outputs]
        self.output_names = list(self._outputs)

    def run(self, feeds):
        out = self.backend.run(feeds, self._outputs)
        return [out[name] for name in self._outputs]


RUNTIMES = ("onnxruntime", "litert", "openvino")


def open_runner(runtime: str, data: bytes, threads: int = 1) -> Runner:
    if runtime not in RUNTIMES:
        raise CompileError("UnsupportedTarget", f"no runner for runtime {runtime!r}",
                           "use onnxruntime, litert or openvino")
    return BackendRunner(data, runtime, threads)


# ----------------------------------------------------------------------------- data
LABEL_KEYS = ("y", "labels", "label")


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    """``.npz`` (keys = input names, labels under y/labels), a ``.npy`` file, or a directory of ``.npy``."""
    path = Path(path)
    try:
        if path.is_dir():
            files = sorted(path.glob("*.npy"))
            if not files:
                raise CompileError("InvalidData", f"{path} holds no .npy files",
                                   "put one <input name>.npy per model input (and y.npy for labels) there")
            return {f.stem: np.load(f, allow_pickle=False) for f in files}
        if path.suffix == ".npy":
            return {path.stem: np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except CompileError:
        raise
    except FileNotFoundError as e:
        raise CompileError("InvalidData", f"data file {path} does not exist", "check the path") from e
    except Exception as e:
        raise CompileError("InvalidData", f"{path} is not readable .npz/.npy data ({type(e).__name__}: {e})",
                           "save arrays with numpy.savez(path, <input name>=array, y=labels)") from e


def bind(arrays: dict[str, np.ndarray], inputs: list[InputSpec], what: str
         ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Match arrays to model inputs and check dtype and shape; returns (feeds [N,...], labels)."""
    arrays = dict(arrays)
    labels = None
    for k in LABEL_KEYS:
        if k in arrays and k not in {i.name for i in inputs}:
            labels = arrays.pop(k)
            break
    feeds: dict[str, np.ndarray] = {}
    for spec in inputs:
        if spec.name in arrays:
            feeds[spec.name] = arrays[spec.name]
        elif len(inputs) == 1 and len(arrays) == 1:
            feeds[spec.name] = next(iter(arrays.values()))
        else:
            raise CompileError(
                "InvalidData", f"{what} data has no array for model input {spec.name!r} (has {sorted(arrays)})",
                f"save it with numpy.savez(path, {spec.name}=array)")
    n = None
    for spec in inputs:
        a = feeds[spec.name]
        if a.dtype != np.dtype(spec.dtype):
            raise CompileError(
                "InvalidData",
                f"{what} data for input {spec.name!r} is {a.dtype}, the model expects {np.dtype(spec.dtype)}",
                f"convert it: array.astype(numpy.{np.dtype(spec.dtype).name})")
        want = spec.shape
        ok = a.ndim == len(want) and all(w is None or w == g for w, g in zip(want[1:], a.shape[1:], strict=False))
        if not ok:
            shown = ["N" if w is None else w for w in want]
            raise CompileError(
                "InvalidData",
                f"{what} data for input {spec.name!r} has shape {list(a.shape)}, the model expects {shown} "
                "(first axis = samples)",
                f"reshape the data to [samples, {', '.join(str(s) for s in shown[1:])}]")
        if n is not None and a.shape[0] != n:
            raise CompileError("InvalidData", f"{what} inputs have different sample counts",
                               "give every input the same number of samples")
        n = a.shape[0]
    if labels is not None and n is not None and len(labels) != n:
        raise CompileError("InvalidData", f"{what} labels have {len(labels)} entries for {n} samples",
                           "give one label per sample")
    return feeds, labels


def synthetic(inputs: list[InputSpec], n: int = 16, seed: int = 0, dynamic_size: int = 8) -> dict[str, np.ndarray]:
    """Stand-in evaluation inputs when none are given (uniform [0,1) floats, small ints).

    Dynamic non-batch dims get ``dynamic_size``."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec in inputs:
        shape = [n] + [d if d is not None else dynamic_size for d in spec.shape[1:]]
        if np.issubdtype(np.dtype(spec.dtype), np.integer):
            out[spec.name] = rng.integers(0, 10, shape).astype(spec.dtype)
        else:
            out[spec.name] = rng.random(shape).astype(spec.dtype)
    return out


def batches(feeds: dict[str, np.ndarray], inputs: list[InputSpec], max_batch: int = 64):
    n = next(iter(feeds.values())).shape[0]
    fixed = [s.shape[0] for s in inputs if s.shape and s.shape[0] is not None]
    size = min(fixed) if fixed else max_batch
    stop = n - n % size if fixed else n  # a fixed batch dim cannot take a short last batch
    for s in range(0, stop, size):
        yield {k: v[s : s + size] for k, v in feeds.items()}


def run_all(runner: Runner, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    outs: list[list[np.ndarray]] = []
    for b in batches(feeds, runner.inputs):
        for i, o in enumerate(runner.run(b)):
            if len(outs) <= i:
                outs.append([])
            outs[i].append(np.asarray(o))
    return [np.concatenate(o, axis=0) for o in outs]


# ----------------------------------------------------------------------------- measurement
def latency(runtime: str, data: bytes, feed: dict[str, np.ndarray], runs: int, threads_n: int) -> Latency:
    lat = Latency(threadsN=threads_n)
    for t in (1, threads_n) if threads_n != 1 else (1,):
        t0 = time.perf_counter()
        r = open_runner(runtime, data, t)
        load = time.perf_counter() - t0
        for _ in range(3):
            r.run(feed)
        times = _timed_runs(r, feed, runs, MIN_SECONDS if t == 1 else 0.0)  # selection compares p50 @1 thread
        p50, p95 = _steady_p50(times), float(np.percentile(times, 95))
        if t == 1:
            lat.loadSeconds, lat.p50Ms1, lat.p95Ms1 = round(load, 4), round(p50, 4), round(p95, 4)
            lat.p50MsN, lat.p95MsN = lat.p50Ms1, lat.p95Ms1
        else:
            lat.p50MsN, lat.p95MsN = round(p50, 4), round(p95, 4)
    return lat


MIN_SECONDS = 0.15  # a candidate's runs span at least this long: a preemption of a few ms cannot cover them all
MAX_RUNS = 20_000


def _timed_runs(runner: Runner, feed: dict[str, np.ndarray], runs: int, min_seconds: float = MIN_SECONDS
                ) -> list[float]:
    """Milliseconds of at least ``runs`` runs, more while they have taken under ``min_seconds`` (a small model's 30
    runs take 2 ms, which one burst of load from another process can cover entirely), at most MAX_RUNS."""
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < max(runs, 1) or (time.perf_counter() - started < min_seconds and len(times) < MAX_RUNS):
        t0 = time.perf_counter()
        runner.run(feed)
        times.append((time.perf_counter() - t0) * 1000)
    return times


def _steady_p50(times_ms: list[float], blocks: int = 3) -> float:
    """The median of the quietest of ``blocks`` consecutive blocks of runs: a burst of load from other processes
    during one block (candidates are measured one after another) does not decide which candidate is faster."""
    size = len(times_ms) // blocks
    if size < 5:
        return float(np.median(times_ms))
    return float(min(np.median(times_ms[i * size:(i + 1) * size]) for i in range(blocks)))


def compare(ref: list[np.ndarray], got: list[np.ndarray], labels: np.ndarray | None, synthetic_data: bool
            ) -> Metrics:
    n = ref[0].shape[0]
    r = np.concatenate([o.reshape(n, -1).astype(np.float64) for o in ref], axis=1)
    g = np.concatenate([o.reshape(n, -1).astype(np.float64) for o in got], axis=1)
    num = (r * g).sum(1)
    den = np.linalg.norm(r, axis=1) * np.linalg.norm(g, axis=1)
    cos = np.where(den > 0, num / np.maximum(den, 1e-30), np.where(np.abs(r - g).max(1) == 0, 1.0, 0.0))
    m = Metrics(samples=int(n), synthetic=synthetic_data, cosine=round(float(cos.mean()), 6),
                minCosine=round(float(cos.min()), 6), maxAbsDiff=float(np.abs(r - g).max()))
    r0, g0 = ref[0], got[0]
    if r0.ndim == 2 and r0.shape[1] > 1:
        m.agreement = round(float((r0.argmax(1) == g0.argmax(1)).mean()), 6)
        if labels is not None:
            y = np.asarray(labels).reshape(-1)
            m.referenceAccuracy = round(float((r0.argmax(1) == y).mean()), 6)
            m.accuracy = round(float((g0.argmax(1) == y).mean()), 6)
            m.accuracyDelta = round((m.accuracy - m.referenceAccuracy) * 100, 4)
    return m


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)
