"""Sinks: MQTT (paho-mqtt, QoS 1 or 2: a result counts as delivered once the broker acknowledged it) and an HTTP
webhook (a JSON array per batch; delivered on 2xx). ``send`` delivers a whole batch, in order, or raises
SinkError; the worker then keeps the batch in the disk queue and tries again."""

from __future__ import annotations

import threading
import time
import urllib.request
import uuid
from typing import Any

from .config import Sink
from .diskqueue import Item

MAX_RESPONSE_BYTES = 64 << 10


class SinkError(Exception):
    pass


class MqttSink:
    def __init__(self, sink: Sink, pipeline: str):
        assert sink.mqtt is not None
        self.settings = sink.mqtt
        self.client_id = sink.mqtt.client_id or f"edgefleet-{pipeline}-{sink.name}-{uuid.uuid4().hex[:8]}"
        self.client: Any = None  # a paho Client once connected

    def _connect(self):
        import paho.mqtt.client as mqtt

        s = self.settings
        connected = threading.Event()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=True)
        client.max_inflight_messages_set(1000)
        client.max_queued_messages_set(1000)
        client.on_connect = lambda *_args: connected.set()
        client.connect_timeout = s.timeout_seconds
        try:
            client.connect(s.host, s.port, keepalive=s.keepalive_seconds)
        except (OSError, ValueError) as e:
            raise SinkError(f"mqtt {s.host}:{s.port}: cannot connect: {e}") from None
        client.loop_start()
        if not connected.wait(s.timeout_seconds) or not client.is_connected():
            self._drop(client)
            raise SinkError(f"mqtt {s.host}:{s.port}: no CONNACK within {s.timeout_seconds} s")
        return client

    @staticmethod
    def _drop(client) -> None:
        """Forget a client and whatever it still holds in memory: the disk queue keeps the undelivered."""
        try:
            client.disconnect()
        finally:
            client.loop_stop()

    def send(self, items: list[Item]) -> None:
        if self.client is None or not self.client.is_connected():
            if self.client is not None:
                self._drop(self.client)
                self.client = None
            self.client = self._connect()
        s = self.settings
        infos = [self.client.publish(s.topic, item.body, qos=s.qos) for item in items]
        deadline = time.monotonic() + s.timeout_seconds
        for info in infos:
            try:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            except (RuntimeError, ValueError) as e:  # paho: not connected / queue full
                self._fail(f"publish failed: {e}")
            if not info.is_published():
                self._fail(f"no acknowledgement within {s.timeout_seconds} s")

    def _fail(self, why: str):
        client, self.client = self.client, None
        if client is not None:
            self._drop(client)
        raise SinkError(f"mqtt {self.settings.host}:{self.settings.port}: {why}")

    def close(self) -> None:
        if self.client is not None:
            self._drop(self.client)
            self.client = None


class WebhookSink:
    def __init__(self, sink: Sink, pipeline: str):
        assert sink.webhook is not None
        self.settings = sink.webhook

    def send(self, items: list[Item]) -> None:
        body = b"[" + b",".join(item.body for item in items) + b"]"
        req = urllib.request.Request(self.settings.url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.settings.timeout_seconds) as resp:  # noqa: S310
                resp.read(MAX_RESPONSE_BYTES)
                status = resp.status
        except (OSError, ValueError) as e:
            raise SinkError(f"webhook {self.settings.url}: {getattr(e, 'reason', None) or e}") from None
        if not 200 <= status < 300:
            raise SinkError(f"webhook {self.settings.url}: answered {status}")

    def close(self) -> None:
        pass


def open_sink(sink: Sink, pipeline: str):
    return MqttSink(sink, pipeline) if sink.mqtt is not None else WebhookSink(sink, pipeline)
