"""Declarative updates of a running server: a folder of small files (a downward-API volume of the pod's
annotations) that ``serve --control-dir`` reads every poll.

    DIR/active     sha256:<hex>: the variant to serve (annotation edgefleet.io/active-digest). When it names a
                   blob in the cache other than the served one, that blob is loaded beside the served model
                   (digest and signature checked, warmed up) and swapped in; requests in flight finish on the
                   old model. A blob not in the cache, or one that fails its checks, is not activated: the old
                   model keeps serving and the reason is logged and exported.
    DIR/prefetch   {"ref": REF, "digest": "sha256:..", "deltas": ["base=..,digest=..,ref=..", ...]}
                   (edgefleet.io/prefetch): fetched into the cache in the background, deltas first, verified as
                   the init container verifies (fetch.fetch), while the served model keeps serving.
    DIR/shadow     {"digest": "sha256:..", "sampleRate": 0.1} (edgefleet.io/shadow): mirror that fraction of
                   requests to this cached variant (shadow.Shadow); empty: no shadow.

An empty or missing file means "nothing asked". Each file is read at most MAX_FILE_BYTES. Work that takes time
(load, fetch) runs on one background thread at a time; a request that failed is retried after RETRY_SECONDS.
The state is exported as ``edgefleet_runtime_control{kind,digest,state}`` (1 for the current state), and the
reason of a failed or missing one as ``edgefleet_runtime_control_reason{kind,digest,reason}`` (what the
operator shows in status).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge

from . import trust
from .backends import ModelLoadError
from .digest import DigestError, blob_path, parse_digest

log = logging.getLogger("edgefleet_runtime.control")

MAX_FILE_BYTES = 64 << 10
RETRY_SECONDS = 30.0
MAX_REASON = 200  # characters of a failure reason exported as a label
STATES = ("pending", "done", "failed", "missing")


class ControlError(ValueError):
    """A control file that cannot be used: the message names the file and what is wrong."""


def read_file(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return ""
    if len(data) > MAX_FILE_BYTES:
        raise ControlError(f"{path} is larger than {MAX_FILE_BYTES} bytes")
    return data.decode("utf-8", "replace").strip()


def parse_active(text: str) -> str | None:
    if not text:
        return None
    try:
        return "sha256:" + parse_digest(text)
    except DigestError as e:
        raise ControlError(f"active: {e}") from None


def parse_json(name: str, text: str, required: tuple[str, ...]) -> dict | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ControlError(f"{name}: not JSON ({e})") from None
    if not isinstance(value, dict) or any(k not in value for k in required):
        raise ControlError(f"{name}: expected a JSON object with {', '.join(required)}")
    try:
        value["digest"] = "sha256:" + parse_digest(value["digest"])
    except DigestError as e:
        raise ControlError(f"{name}: {e}") from None
    return value


class Control:
    """Polls ``directory`` and drives ``slot`` (app.ModelSlot): activation, prefetch and the shadow candidate."""

    def __init__(self, directory: str | os.PathLike, cache: str | os.PathLike, slot, registry: CollectorRegistry,
                 make_candidate=None, fetch_options: dict | None = None):
        self.dir = Path(directory)
        self.cache = Path(cache)
        self.slot = slot
        self.make_candidate = make_candidate  # (digest, sample_rate) -> shadow.Shadow, or None: no shadow
        self.fetch_options = fetch_options or {}
        self.shadow = None
        self.state = Gauge("edgefleet_runtime_control", "State of what the control folder asks (1 = this state)",
                           ["kind", "digest", "state"], registry=registry)
        self.reason = Gauge("edgefleet_runtime_control_reason", "Why what the control folder asks failed (1 for "
                            "the current reason; cleared when the state changes)", ["kind", "digest", "reason"],
                            registry=registry)
        self._reason: dict[str, tuple[str, str]] = {}
        self._busy = threading.Lock()
        self._seen: dict[str, tuple[str, float]] = {}  # kind -> (what was last tried, when), for retries
        self._last_state: dict[str, tuple[str, str]] = {}

    def _set(self, kind: str, digest: str, state: str, reason: str = "") -> None:
        old = self._last_state.get(kind)
        if old is not None:
            self.state.labels(kind, old[0], old[1]).set(0)
        self._last_state[kind] = (digest, state)
        self.state.labels(kind, digest, state).set(1)
        stale = self._reason.pop(kind, None)
        if stale is not None:
            self.reason.remove(kind, *stale)
        if reason:
            self._reason[kind] = (digest, reason[:MAX_REASON])
            self.reason.labels(kind, digest, reason[:MAX_REASON]).set(1)
        if state in ("failed", "missing"):
            log.warning(f"{kind} not done", extra={"kind": kind, "digest": digest, "state": state, "reason": reason})

    def _due(self, kind: str, key: str) -> bool:
        """True when ``key`` was not tried yet, or its last try is RETRY_SECONDS old."""
        last = self._seen.get(kind)
        return last is None or last[0] != key or time.monotonic() - last[1] >= RETRY_SECONDS

    def poll(self) -> None:
        """One look at the folder; starts at most one background job. Never raises."""
        for kind, step in (("shadow", self._poll_shadow), ("active", self._poll_active),
                           ("prefetch", self._poll_prefetch)):
            try:
                step()
            except ControlError as e:
                if self._due(kind, str(e)):
                    self._seen[kind] = (str(e), time.monotonic())
                    self._set(kind, "", "failed", str(e))

    def _background(self, kind: str, key: str, job) -> None:
        if not self._due(kind, key) or not self._busy.acquire(blocking=False):
            return
        self._seen[kind] = (key, time.monotonic())

        def run():
            try:
                job()
            finally:
                self._busy.release()

        threading.Thread(target=run, name=f"control-{kind}", daemon=True).start()

    def _poll_active(self) -> None:
        digest = parse_active(read_file(self.dir / "active"))
        current = self.slot.current
        if digest is None or (current is not None and current.digest == digest):
            if digest is not None and self._last_state.get("active") != (digest, "done"):
                self._set("active", digest, "done")
            return
        blob = blob_path(self.cache, digest)
        if not blob.exists():
            if self._due("active", "missing " + digest):
                self._seen["active"] = ("missing " + digest, time.monotonic())
                self._set("active", digest, "missing", f"{blob} is not in the cache: prefetch it first")
            return
        self._background("active", digest, lambda: self._activate(blob, digest))

    def _activate(self, blob: Path, digest: str) -> None:
        self._set("active", digest, "pending")
        t0 = time.perf_counter()
        try:
            self.slot.load(str(blob), digest)
        except (DigestError, trust.TrustError, ModelLoadError, OSError) as e:
            self._set("active", digest, "failed", f"{type(e).__name__}: {e}")
            return
        self._set("active", digest, "done")
        log.info("activated in place", extra={"digest": digest, "seconds": round(time.perf_counter() - t0, 4)})

    def _poll_prefetch(self) -> None:
        spec = parse_json("prefetch", read_file(self.dir / "prefetch"), ("ref", "digest"))
        if spec is None:
            return
        digest = spec["digest"]
        if blob_path(self.cache, digest).exists():
            if self._last_state.get("prefetch") != (digest, "done"):
                self._set("prefetch", digest, "done")
            return
        self._background("prefetch", digest, lambda: self._prefetch(spec))

    def _prefetch(self, spec: dict) -> None:
        from .fetch import DeltaSource, fetch

        digest = spec["digest"]
        self._set("prefetch", digest, "pending")
        try:
            deltas = [DeltaSource.parse(str(d)) for d in spec.get("deltas") or []]
            fetch(str(spec["ref"]), digest, self.cache, deltas=deltas, **self.fetch_options)
        except Exception as e:  # noqa: BLE001 - every failure is a state with its reason; serving goes on
            self._set("prefetch", digest, "failed", f"{type(e).__name__}: {str(e)[:300]}")
            return
        self._set("prefetch", digest, "done")

    def _poll_shadow(self) -> None:
        spec = parse_json("shadow", read_file(self.dir / "shadow"), ("digest",))
        if spec is None or self.make_candidate is None:
            if self.shadow is not None:
                self.shadow.stop()
                self.shadow = None
            return
        try:
            rate = float(spec.get("sampleRate", 0.1))
        except (TypeError, ValueError):
            raise ControlError(f"shadow: sampleRate {spec.get('sampleRate')!r} is not a number") from None
        if not 0.0 <= rate <= 1.0:
            raise ControlError(f"shadow: sampleRate {rate} must be between 0 and 1")
        if self.shadow is not None and (self.shadow.digest, self.shadow.sample_rate) == (spec["digest"], rate):
            return
        blob = blob_path(self.cache, spec["digest"])
        if not blob.exists():
            if self._due("shadow", "missing " + spec["digest"]):
                self._seen["shadow"] = ("missing " + spec["digest"], time.monotonic())
                self._set("shadow", spec["digest"], "missing", f"{blob} is not in the cache: prefetch it first")
            return
        self._background("shadow", f"{spec['digest']} {rate}", lambda: self._start_shadow(blob, spec["digest"], rate))

    def _start_shadow(self, blob: Path, digest: str, rate: float) -> None:
        self._set("shadow", digest, "pending")
        try:
            shadow = self.make_candidate(str(blob), digest, rate)
        except (DigestError, trust.TrustError, ModelLoadError, OSError, ValueError) as e:
            self._set("shadow", digest, "failed", f"{type(e).__name__}: {e}")
            return
        old, self.shadow = self.shadow, shadow
        if old is not None:
            old.stop()
        self._set("shadow", digest, "done")
