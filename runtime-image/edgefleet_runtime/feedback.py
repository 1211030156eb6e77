"""What a serving runtime sends back: the drift reference it computes from the evaluation data, and the hard
examples it uploads from its spool as OCI artifacts.

Drift reference (``serve --drift-eval DATA``): the served variant runs once over the evaluation data at start,
and ``monitor.distribution`` of its outputs (and first input) becomes the reference of the PSI window, so the
live traffic is compared with what this variant, on this node, answers on the data it was accepted on.

Uploader (``serve --hard-examples-upload oci://HOST[:PORT]/REPO``): a thread that, every interval (at once when
a batch is full), pushes the oldest spooled examples, at most ``batch`` of them, as one OCI artifact: one
layer per example (``application/vnd.edgefleet.hard-example.v1+npz``, the spool's file name as its title)
and the model, model digest, hardware class, node and count as manifest annotations. Only a push the
registry accepted removes files from the spool; a failed one leaves them and waits longer (doubling, up to
``MAX_BACKOFF`` and 16 intervals), so a registry that is away loses nothing the spool holds. The tag is a hash
of the batch's file names: a batch pushed again after a crash between push and delete lands on the same tag, not twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import random
import re
import threading
from pathlib import Path

import numpy as np

from .bench import BenchError, _batch_size, _batches, bind, load_eval
from .monitor import HardExamples, distribution

log = logging.getLogger("edgefleet_runtime.feedback")

EXAMPLE_MEDIA_TYPE = "application/vnd.edgefleet.hard-example.v1+npz"
ARTIFACT_TYPE = "application/vnd.edgefleet.hard-examples.v1"
ANNOTATION = "io.edgefleet.hard-examples."  # + model, model-digest, class, node, count
MAX_BACKOFF = 600.0
PUSH_SECONDS = 120.0  # one batch's push, retries included
LOCK = ".upload.lock"  # in the spool: one uploader per spool at a time, across processes
MAX_EVAL_SAMPLES = 5000


def eval_reference(backend, path: str, output: str | None = None) -> dict:
    """The drift reference of ``backend`` on the evaluation data at ``path``; ValueError naming the flag."""
    try:
        arrays, _ = load_eval(path, MAX_EVAL_SAMPLES)
        feeds = bind(arrays, backend.inputs)
    except BenchError as e:
        raise ValueError(str(e).replace("--eval", "--drift-eval")) from e
    name = output or backend.outputs[0].name
    outs, seen = [], 0
    for batch in _batches(feeds, _batch_size(backend.inputs)):
        outs.append(np.asarray(backend.run(batch, [name])[name]))
        seen += next(iter(batch.values())).shape[0]
    if not outs:
        raise ValueError(f"--drift-eval {path}: fewer samples than the model's fixed batch; add samples")
    ref = distribution(np.concatenate(outs), next(iter(feeds.values()))[:seen], name)
    if ref is None:
        raise ValueError(f"--drift-eval {path}: output {name!r} is not [batch, classes]; pass --monitor-output")
    return ref


def _tag(klass: str, node: str, names: list[str]) -> str:
    h = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    return re.sub(r"[^A-Za-z0-9_.-]", "-", f"{klass or 'class'}-{node or 'node'}-{h}")[:128]


class Uploader:
    """Pushes the spool's examples in batches; ``push(files, annotations, tag)`` raises on failure."""

    def __init__(self, spool: HardExamples, destination: str, meta: dict[str, str], batch: int = 100,
                 interval: float = 60.0, insecure: bool = False, push=None):
        if not destination.startswith("oci://") or "/" not in destination[len("oci://"):]:
            raise ValueError(f"--hard-examples-upload {destination}: expected oci://HOST[:PORT]/REPOSITORY")
        if batch < 1 or interval <= 0:
            raise ValueError("--hard-examples-batch must be at least 1 and --hard-examples-upload-interval above 0")
        self.spool = spool
        self.destination = destination[len("oci://"):].rstrip("/")
        self.meta = meta
        self.batch = batch
        self.interval = interval
        self.insecure = insecure
        self._push = push or self._oras_push
        self.uploaded = 0
        self.artifacts = 0
        self.failures = 0
        self.last_error = ""
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        spool.on_spooled = self._spooled

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="hard-examples-upload", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _spooled(self, count: int) -> None:
        if count >= self.batch:
            self._wake.set()

    def _loop(self) -> None:
        delay = self.interval
        while not self._stop.is_set():
            self._wake.wait(delay)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                while self.upload_once() == self.batch and not self._stop.is_set():
                    pass  # a full batch went: there may be more
                delay = self.interval
            except Exception as e:  # the registry is away or refuses: keep the files, try later
                self.failures += 1
                self.last_error = f"{type(e).__name__}: {e}"[:500]
                delay = min(max(delay, self.interval) * 2, MAX_BACKOFF, 16 * self.interval) * random.uniform(0.8, 1)
                log.warning("hard examples not uploaded; kept in the spool",
                            extra={"error": self.last_error, "retry_seconds": round(delay, 1)})

    def upload_once(self) -> int:
        """Push the oldest batch; the number of examples uploaded (0: the spool is empty, or another pod on this
        node is uploading from it: a surge rollout runs two beside each other). Raises when the push fails,
        leaving the spool as it was."""
        with open(self.spool.dir / LOCK, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0
            return self._upload_batch()

    def _upload_batch(self) -> int:
        files = self.spool.oldest(self.batch)
        if not files:
            return 0
        names = [f.name for f in files]
        annotations = {ANNOTATION + k: str(v) for k, v in self.meta.items() if v}
        annotations[ANNOTATION + "count"] = str(len(files))
        tag = _tag(self.meta.get("class", ""), self.meta.get("node", ""), names)
        self._push(files, annotations, tag)
        self.spool.remove(files)
        self.uploaded += len(files)
        self.artifacts += 1
        log.info("hard examples uploaded", extra={"count": len(files), "ref": f"{self.destination}:{tag}"})
        return len(files)

    def _oras_push(self, files: list[Path], annotations: dict[str, str], tag: str) -> None:
        from .fetch import pusher_login, registry_for

        # the project's registry client: every request times out within PUSH_SECONDS, one try each (the upload
        # loop backs off itself between batches)
        client = registry_for(self.destination.split("/", 1)[0], self.insecure, PUSH_SECONDS, attempts=1,
                              login=pusher_login())
        paths = [f"{f}:{EXAMPLE_MEDIA_TYPE}" for f in files]  # each layer is titled with its file name
        # oras writes the empty config to $TMPDIR (an emptyDir at /tmp in the pod: the root filesystem is read-only)
        resp = client.push(target=f"{self.destination}:{tag}", files=paths, manifest_annotations=annotations,
                           disable_path_validation=True, quiet=True)
        if getattr(resp, "status_code", 201) >= 300:
            raise OSError(f"push to {self.destination}:{tag}: HTTP {resp.status_code} {resp.text[:200]}")

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        yield CounterMetricFamily("edgefleet_runtime_hard_examples_uploaded", "Hard examples pushed to the registry",
                                  value=self.uploaded)
        yield CounterMetricFamily("edgefleet_runtime_hard_examples_upload_failures", "Pushes that failed (retried)",
                                  value=self.failures)

