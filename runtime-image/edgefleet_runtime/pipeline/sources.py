"""Frame sources: a directory or file of images, an HTTP MJPEG stream, a video (RTSP, HTTP, a file) through PyAV.
Each yields frames (encoded bytes or a decoded PIL image, stamped when captured) and ``Bad`` records for input it
refused; a stream it cannot reach raises ``Unreachable`` (the runner counts it and reconnects). Every network read
has the source's deadline and every frame its size cap."""

from __future__ import annotations

import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .config import Source

MAX_DIRECTORY_FILES = 1_000_000
READ_CHUNK = 64 << 10
MAX_BURST_SECONDS = 1.0  # a source that fell behind its fps catches up at most this much


@dataclass
class Frame:
    source: str
    index: int  # the frame's number in its source (taken frames only, from 0)
    captured: float  # time.time() when it was read
    data: bytes | None = None  # an encoded image (JPEG/PNG), or
    image: Any = None  # a decoded PIL image


@dataclass
class Bad:
    source: str
    reason: str  # corrupt | too_large | unsupported | unreachable
    message: str


class Unreachable(Exception):
    """The source cannot be opened or read (the runner retries it with backoff)."""


class Sampler:
    """Which frames to take: one in ``every``, at most ``fps`` a second. ``pace``: wait for the next slot (files and
    directories play like a camera) instead of skipping (live streams)."""

    def __init__(self, fps: float | None, every: int, pace: bool, stop: threading.Event):
        self.interval = 1.0 / fps if fps else 0.0
        self.every, self.pace, self.stop = every, pace, stop
        self.seen = 0
        self.next_due = time.monotonic()

    def take(self) -> bool:
        self.seen += 1
        if (self.seen - 1) % self.every:
            return False
        if not self.interval:
            return True
        now = time.monotonic()
        if self.pace:
            if now < self.next_due:
                self.stop.wait(self.next_due - now)
        elif now < self.next_due:
            return False
        # keep the schedule (a late frame is made up by the next ones), but never catch up more than MAX_BURST
        self.next_due = max(self.next_due + self.interval, time.monotonic() - MAX_BURST_SECONDS)
        return True


def frames(src: Source, stop: threading.Event) -> Iterator[Frame | Bad]:
    """The frames of one pass over ``src`` (a live stream: until it fails, raising Unreachable)."""
    if src.kind in ("directory", "file"):
        return _files(src, stop)
    if src.kind == "mjpeg":
        return _mjpeg(src, stop)
    return _video(src, stop)


def finite(src: Source) -> bool:
    """Does one pass end (a directory, a file, a local video) rather than run until stopped?"""
    return src.kind in ("directory", "file") or (src.kind == "video" and "://" not in src.url)


def _files(src: Source, stop: threading.Event) -> Iterator[Frame | Bad]:
    if src.kind == "file":
        paths = [src.url]
    else:
        try:
            with os.scandir(src.url) as it:
                names: list[str] = []
                for entry in it:
                    if len(names) >= MAX_DIRECTORY_FILES:
                        break
                    if entry.is_file(follow_symlinks=False):
                        names.append(entry.name)
        except OSError as e:
            raise Unreachable(f"directory {src.url}: {e.strerror or e}") from None
        paths = [os.path.join(src.url, n) for n in sorted(names)]
    sampler = Sampler(src.fps, src.every, pace=True, stop=stop)
    index = 0
    for path in paths:
        if stop.is_set():
            return
        if not sampler.take():
            continue
        try:
            with open(path, "rb") as f:
                data = f.read(src.max_frame_bytes + 1)
        except OSError as e:
            yield Bad(src.name, "unreadable", f"{path}: {e.strerror or e}")
            continue
        if len(data) > src.max_frame_bytes:
            yield Bad(src.name, "too_large", f"{path}: over maxFrameBytes {src.max_frame_bytes}")
            continue
        yield Frame(src.name, index, time.time(), data=data)
        index += 1


def _mjpeg(src: Source, stop: threading.Event) -> Iterator[Frame | Bad]:
    """JPEG frames cut out of a multipart/x-mixed-replace body by their start and end markers."""
    try:
        resp = urllib.request.urlopen(src.url, timeout=src.timeout_seconds)  # noqa: S310 - http(s) checked
    except (OSError, ValueError) as e:
        raise Unreachable(f"{src.url}: {getattr(e, 'reason', None) or e}") from None
    sampler = Sampler(src.fps, src.every, pace=False, stop=stop)
    buf, index = bytearray(), 0
    with resp:
        while not stop.is_set():
            try:
                chunk = resp.read1(READ_CHUNK) if hasattr(resp, "read1") else resp.read(READ_CHUNK)
            except (OSError, ValueError) as e:
                raise Unreachable(f"{src.url}: read failed: {e}") from None
            if not chunk:
                raise Unreachable(f"{src.url}: the stream ended")
            buf += chunk
            while True:
                start = buf.find(b"\xff\xd8")
                end = buf.find(b"\xff\xd9", start + 2) if start >= 0 else -1
                if start < 0 or end < 0:
                    break
                jpeg = bytes(buf[start:end + 2])
                del buf[:end + 2]
                if sampler.take():
                    yield Frame(src.name, index, time.time(), data=jpeg)
                    index += 1
            if len(buf) > src.max_frame_bytes:
                yield Bad(src.name, "too_large", f"{src.url}: no complete frame within maxFrameBytes "
                                                 f"{src.max_frame_bytes}")
                keep = buf.rfind(b"\xff\xd8")
                del buf[:keep if keep > 0 else len(buf)]
                if len(buf) > src.max_frame_bytes:
                    buf.clear()


def _video(src: Source, stop: threading.Event) -> Iterator[Frame | Bad]:
    """Decoded frames of a video through PyAV (FFmpeg): RTSP, HTTP(S) or a file. A packet that does not decode is
    a Bad frame; the stream goes on."""
    import av

    options = {"rtsp_transport": "tcp"} if src.url.startswith("rtsp") else {}
    try:
        container = av.open(src.url, options=options, timeout=(src.timeout_seconds, src.timeout_seconds))
    except (av.error.FFmpegError, OSError) as e:
        raise Unreachable(f"{src.url}: {e}") from None
    live = not finite(src)
    sampler = Sampler(src.fps, src.every, pace=not live, stop=stop)
    index = 0
    with container:
        if not container.streams.video:
            raise Unreachable(f"{src.url}: no video stream")
        stream = container.streams.video[0]
        packets = container.demux(stream)
        while not stop.is_set():
            try:
                packet = next(packets)
            except StopIteration:
                break
            except (av.error.FFmpegError, OSError) as e:
                raise Unreachable(f"{src.url}: read failed: {e}") from None
            try:
                decoded = packet.decode()
            except (av.error.FFmpegError, ValueError) as e:
                yield Bad(src.name, "corrupt", f"{src.url}: a packet does not decode: {e}")
                continue
            for frame in decoded:
                if sampler.take():
                    yield Frame(src.name, index, time.time(), image=frame.to_image())
                    index += 1
    if live and not stop.is_set():
        raise Unreachable(f"{src.url}: the stream ended")
