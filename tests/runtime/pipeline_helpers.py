"""Real servers for the pipeline tests: a Mosquitto broker (Debian's `mosquitto`, with persistence so a restart
keeps a subscriber's session) and a subscriber that records what reaches it; videos and streams made by ffmpeg."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
FFMPEG = shutil.which("ffmpeg")


def need(tool: str | None, package: str) -> str:
    """The path of a system tool the test needs; a failure naming the Debian package (.ci/run installs it)."""
    assert tool, f"{package} is not installed: apt-get install {package} (.ci/run installs it)"
    return tool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class Broker:
    """mosquitto on 127.0.0.1:port; stop() and start() again keep its persisted sessions."""

    def __init__(self, tmp: Path, port: int | None = None):
        self.port = port or free_port()
        self.dir = tmp / f"mosquitto-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                             f"persistence_location {self.dir}/\nmax_queued_messages 100000\nuser root\n"
                             f"log_dest file {self.dir}/log.txt\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> Broker:
        self.proc = subprocess.Popen([need(MOSQUITTO, "mosquitto"), "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: mosquitto saves its persistence file
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class Subscriber:
    """A persistent-session QoS 1 subscriber: messages published while it is away (the broker restarting) wait
    for it at the broker. ``records``: every message's JSON, in arrival order (duplicates included)."""

    def __init__(self, port: int, topic: str):
        import paho.mqtt.client as mqtt

        self.records: list[dict] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-sub-{port}",
                                  clean_session=False)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        assert self.subscribed.wait(10), "the test subscriber did not subscribe"

    def _on_message(self, _client, _userdata, message) -> None:
        with self.lock:
            self.records.append(json.loads(message.payload))

    def frames(self, source: str | None = None) -> list[int]:
        with self.lock:
            return [r["frame"] for r in self.records if source is None or r["source"] == source]

    def wait_for(self, count: int, timeout: float, source: str | None = None) -> list[int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(set(self.frames(source))) < count:
            time.sleep(0.05)
        return self.frames(source)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def first_seen(frames: list[int]) -> list[int]:
    """The frames in order of first arrival (a redelivery after a lost acknowledgement is a duplicate)."""
    seen: set[int] = set()
    out = []
    for f in frames:
        if f not in seen:
            seen.add(f)
            out.append(f)
    return out


def make_video(path: Path, seconds: float, fps: int = 25, size: str = "640x480") -> Path:
    """A generated test-pattern video (H.264 in MP4), encoded by ffmpeg."""
    subprocess.run([need(FFMPEG, "ffmpeg"), "-v", "error", "-y", "-f", "lavfi", "-i",
                    f"testsrc=size={size}:rate={fps}", "-t", str(seconds), "-pix_fmt", "yuv420p", "-c:v",
                    "libx264", "-preset", "ultrafast", str(path)], check=True, timeout=120)
    return path


def count_frames(path: Path) -> int:
    """Frames in a video, decoded independently of the pipeline (PyAV)."""
    import av

    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))
