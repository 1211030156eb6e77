"""The server side of an HTTP/2 connection (RFC 9113), as much as unary gRPC needs, built for hostile peers.

Why not ``h2``: its general state machine cost about 360 us of CPU per unary call here, more than a whole REST
request (docs/runtime.md). This one parses frames with ``struct``, decodes header blocks with ``hpack`` (the
decoder h2 uses, with its header-list bound) and writes responses from pre-encoded header blocks.

Checked: the client preface and that SETTINGS comes first; frame sizes against our SETTINGS_MAX_FRAME_SIZE;
padding; stream ids (odd, increasing); CONTINUATION only right after its HEADERS, at most MAX_CONTINUATIONS and
``max_header_bytes`` of header block; flow control both ways (a peer that sends past our windows or overflows
its own is a FLOW_CONTROL_ERROR); SETTINGS values; WINDOW_UPDATE increments; PUSH_PROMISE from a client.
Any violation raises :class:`ProtocolError`: the caller sends GOAWAY and closes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, ENHANCE_YOUR_CALM = (
    0x0, 0x1, 0x3, 0x6, 0x7, 0x8, 0xB)  # fmt: skip
SETTINGS_HEADER_TABLE_SIZE, SETTINGS_ENABLE_PUSH, SETTINGS_MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE, SETTINGS_MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6
DEFAULT_WINDOW = 65535
MAX_WINDOW = (1 << 31) - 1
MAX_FRAME = 16384  # what we accept (the protocol's default; we do not raise it)
MAX_CONTINUATIONS = 32
DECODED_KEPT = 16  # header blocks remembered per connection (``Connection._decode``)
_HEAD = struct.Struct(">HBBBI")  # length as 16 + 8 bits, type, flags, stream id
_U32 = struct.Struct(">I")


class ProtocolError(Exception):
    """A connection error: GOAWAY with ``code`` and close."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(slots=True)
class Event:
    kind: str  # "headers" | "data" | "reset" | "settings" | "ping" | "window" | "goaway" | "other"
    sid: int = 0
    headers: list[tuple[bytes, bytes]] | None = None
    data: bytes = b""
    end: bool = False
    size: int = 0  # DATA: what it counted against the connection's window (padding included)


def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _HEAD.pack(n >> 8, n & 0xFF, kind, flags, sid) + payload


def _int(value: int, prefix: int, first: int = 0) -> bytes:
    """HPACK integer with a ``prefix``-bit prefix (RFC 7541 5.1)."""
    top = (1 << prefix) - 1
    if value < top:
        return bytes([first | value])
    out = [first | top]
    value -= top
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    return bytes([*out, value])


def literal(name: bytes, value: bytes) -> bytes:
    """One header as an HPACK literal without indexing (no Huffman): our encoder keeps no dynamic table."""
    return b"\x00" + _int(len(name), 7) + name + _int(len(value), 7) + value


class Connection:
    """Frames in (``receive``), frames out (``send_*``, collected in ``out``). Streams are the peer's only."""

    def __init__(self, max_streams: int, max_header_bytes: int):
        self.max_streams = max_streams
        self.max_header_bytes = max_header_bytes
        self.decoder = hpack.Decoder(max_header_list_size=max_header_bytes)
        self.buf = bytearray()
        self.out = bytearray()
        self.preface = False
        self.settled = False  # the peer's first SETTINGS arrived
        self.highest = 0  # highest stream id opened by the peer
        self.open: set[int] = set()  # streams the peer has not ended (or reset)
        self.answering: set[int] = set()  # streams we have not ended
        self.recv_window = DEFAULT_WINDOW  # connection level, what the peer may still send
        self.stream_recv: dict[int, int] = {}
        self.send_window = DEFAULT_WINDOW
        self.stream_send: dict[int, int] = {}
        self.peer_initial = DEFAULT_WINDOW
        self.peer_max_frame = MAX_FRAME
        self._block: tuple[int, bool, bytearray, int] | None = None  # HEADERS awaiting CONTINUATION
        self.goaway = False
        self.window_target = DEFAULT_WINDOW
        self.decoded: dict[tuple[tuple[int, int, int, int], bytes], list[tuple[bytes, bytes]]] = {}
        self.unacked = 0

    # ------------------------------------------------------------------ out
    def start(self, settings: dict[int, int], window: int) -> None:
        """Our SETTINGS and the connection's extra receive window: the first frames we send."""
        payload = b"".join(struct.pack(">HI", k, v) for k, v in settings.items())
        self.out += frame(SETTINGS, 0, 0, payload)
        self.window_target = DEFAULT_WINDOW + window
        self.grant(0, window)

    def grant(self, sid: int, n: int) -> None:
        """Let the peer send ``n`` more bytes on ``sid`` (0: the connection)."""
        if n <= 0:
            return
        if sid == 0:
            self.recv_window += n
        elif sid in self.stream_recv:
            self.stream_recv[sid] += n
        else:
            return
        self.out += frame(WINDOW_UPDATE, 0, sid, _U32.pack(n))

    def give_back(self, n: int) -> None:
        """``n`` bytes taken in on the connection: reopen its window once half of it is used."""
        self.unacked += n
        if self.unacked >= self.window_target // 2:
            self.grant(0, self.unacked)
            self.unacked = 0

    def send_headers(self, sid: int, block: bytes, end: bool = False) -> None:
        self.out += frame(HEADERS, END_HEADERS | (END_STREAM if end else 0), sid, block)
        if end:
            self._ended(sid)

    def send_whole(self, sid: int, head: bytes, data: bytes, tail: bytes) -> bool:
        """A whole response (headers, one DATA frame, trailers) if the windows allow it at once; else nothing."""
        n = len(data)
        if n > self.send_window or n > self.stream_send.get(sid, 0) or n > self.peer_max_frame:
            return False
        self.out += b"".join((frame(HEADERS, END_HEADERS, sid, head), frame(DATA, 0, sid, data),
                              frame(HEADERS, END_HEADERS | END_STREAM, sid, tail)))  # fmt: skip
        self.send_window -= n
        self.stream_send[sid] -= n
        self._ended(sid)
        return True

    def send_data(self, sid: int, data: memoryview) -> int:
        """Send what the windows allow of ``data``; return how many bytes went."""
        sent = 0
        while sent < len(data):
            n = min(len(data) - sent, self.send_window, self.stream_send.get(sid, 0), self.peer_max_frame)
            if n <= 0:
                break
            self.out += frame(DATA, 0, sid, bytes(data[sent : sent + n]))
            self.send_window -= n
            self.stream_send[sid] -= n
            sent += n
        return sent

    def reset(self, sid: int, code: int) -> None:
        if sid in self.open or sid in self.answering:
            self.out += frame(RST_STREAM, 0, sid, _U32.pack(code))
        self.open.discard(sid)
        self._ended(sid)

    def close(self, code: int, message: bytes = b"") -> None:
        """GOAWAY: ``highest`` is the last stream we may still answer."""
        self.out += frame(GOAWAY, 0, 0, struct.pack(">II", self.highest, code) + message[:200])

    def _ended(self, sid: int) -> None:
        self.answering.discard(sid)
        if sid not in self.open:
            self.stream_recv.pop(sid, None)
            self.stream_send.pop(sid, None)

    def take_out(self) -> bytes:
        data = bytes(self.out)
        self.out.clear()
        return data

    # ------------------------------------------------------------------ in
    def receive(self, data: bytes) -> list[Event]:
        self.buf += data
        events: list[Event] = []
        if not self.preface:
            if len(self.buf) < len(PREFACE):
                if not PREFACE.startswith(bytes(self.buf)):
                    raise ProtocolError(PROTOCOL_ERROR, "not an HTTP/2 client preface (gRPC needs HTTP/2)")
                return events
            if self.buf[: len(PREFACE)] != PREFACE:
                raise ProtocolError(PROTOCOL_ERROR, "not an HTTP/2 client preface (gRPC needs HTTP/2)")
            del self.buf[: len(PREFACE)]
            self.preface = True
        pos, buf = 0, self.buf
        while len(buf) - pos >= 9:
            hi, lo, kind, flags, sid = _HEAD.unpack_from(buf, pos)
            length = (hi << 8) | lo
            sid &= 0x7FFFFFFF
            if length > MAX_FRAME:
                raise ProtocolError(FRAME_SIZE_ERROR, f"frame of {length} bytes is over {MAX_FRAME}")
            if len(buf) - pos < 9 + length:
                break
            payload = bytes(buf[pos + 9 : pos + 9 + length])
            pos += 9 + length
            self._frame(kind, flags, sid, payload, events)
        del buf[:pos]
        return events

    def _frame(self, kind: int, flags: int, sid: int, payload: bytes, events: list[Event]) -> None:
        if not self.settled and kind != SETTINGS:
            raise ProtocolError(PROTOCOL_ERROR, "the first frame must be SETTINGS")
        if self._block is not None and kind != CONTINUATION:
            raise ProtocolError(PROTOCOL_ERROR, "a header block must go on in CONTINUATION frames")
        if kind == DATA:
            self._data(flags, sid, payload, events)
        elif kind == HEADERS:
            self._headers(flags, sid, payload, events)
        elif kind == CONTINUATION:
            self._continuation(flags, sid, payload, events)
        elif kind == SETTINGS:
            self._settings(flags, sid, payload, events)
        elif kind == WINDOW_UPDATE:
            self._window(sid, payload, events)
        elif kind == RST_STREAM:
            if sid == 0 or len(payload) != 4:
                raise ProtocolError(PROTOCOL_ERROR, "malformed RST_STREAM")
            if sid > self.highest:
                raise ProtocolError(PROTOCOL_ERROR, "RST_STREAM on an idle stream")
            self.open.discard(sid)
            self._ended(sid)
            events.append(Event("reset", sid))
        elif kind == PING:
            if sid != 0 or len(payload) != 8:
                raise ProtocolError(PROTOCOL_ERROR if sid else FRAME_SIZE_ERROR, "malformed PING")
            if not flags & ACK:
                self.out += frame(PING, ACK, 0, payload)
            events.append(Event("ping"))
        elif kind == GOAWAY:
            self.goaway = True
            events.append(Event("goaway"))
        elif kind == PUSH_PROMISE:
            raise ProtocolError(PROTOCOL_ERROR, "a client must not send PUSH_PROMISE")
        elif kind == PRIORITY:
            if sid == 0 or len(payload) != 5:
                raise ProtocolError(PROTOCOL_ERROR, "malformed PRIORITY")
            events.append(Event("other"))
        else:  # unknown frame types are ignored (RFC 9113 5.5), but counted by the caller
            events.append(Event("other"))

    @staticmethod
    def _unpad(flags: int, payload: bytes) -> bytes:
        if not flags & PADDED:
            return payload
        if not payload or payload[0] >= len(payload):
            raise ProtocolError(PROTOCOL_ERROR, "padding longer than the frame")
        return payload[1 : len(payload) - payload[0]]

    def _data(self, flags: int, sid: int, payload: bytes, events: list[Event]) -> None:
        if sid == 0:
            raise ProtocolError(PROTOCOL_ERROR, "DATA on stream 0")
        n = len(payload)
        if n > self.recv_window:
            raise ProtocolError(FLOW_CONTROL_ERROR, "DATA beyond the connection's window")
        self.recv_window -= n
        body = self._unpad(flags, payload)
        if sid not in self.open:
            if sid > self.highest:
                raise ProtocolError(PROTOCOL_ERROR, "DATA on an idle stream")
            self.give_back(n)  # a stream that is over: dropped, its bytes given back
            events.append(Event("other", sid))
            return
        left = self.stream_recv.get(sid, 0) - n
        if left < 0:
            raise ProtocolError(FLOW_CONTROL_ERROR, f"DATA beyond stream {sid}'s window")
        self.stream_recv[sid] = left
        end = bool(flags & END_STREAM)
        if end:
            self.open.discard(sid)
        events.append(Event("data", sid, None, body, end, n))

    def _headers(self, flags: int, sid: int, payload: bytes, events: list[Event]) -> None:
        if sid == 0 or sid % 2 == 0:
            raise ProtocolError(PROTOCOL_ERROR, f"HEADERS on stream {sid}: client streams are odd")
        block = self._unpad(flags, payload)
        if flags & PRIORITY_FLAG:
            if len(block) < 5:
                raise ProtocolError(PROTOCOL_ERROR, "HEADERS too short for its priority")
            block = block[5:]
        if sid <= self.highest and sid not in self.open:
            raise ProtocolError(PROTOCOL_ERROR, f"HEADERS on closed stream {sid}")
        self._block = (sid, bool(flags & END_STREAM), bytearray(block), 0)
        if flags & END_HEADERS:
            self._finish_block(events)
        else:
            self._check_block()

    def _continuation(self, flags: int, sid: int, payload: bytes, events: list[Event]) -> None:
        if self._block is None or self._block[0] != sid:
            raise ProtocolError(PROTOCOL_ERROR, "CONTINUATION without its HEADERS")
        s, end, block, count = self._block
        block += payload
        self._block = (s, end, block, count + 1)
        if flags & END_HEADERS:
            self._finish_block(events)
        else:
            self._check_block()

    def _check_block(self) -> None:
        assert self._block is not None
        if self._block[3] >= MAX_CONTINUATIONS or len(self._block[2]) > self.max_header_bytes:
            raise ProtocolError(ENHANCE_YOUR_CALM, f"header block over {self.max_header_bytes} bytes or "
                                                   f"{MAX_CONTINUATIONS} CONTINUATION frames")

    def _finish_block(self, events: list[Event]) -> None:
        assert self._block is not None
        sid, end, block, _ = self._block
        self._block = None
        if len(block) > self.max_header_bytes:
            raise ProtocolError(ENHANCE_YOUR_CALM, f"header block over {self.max_header_bytes} bytes")
        headers = self._decode(bytes(block))
        if sid in self.open:  # trailers from the client: must end the stream
            if not end:
                raise ProtocolError(PROTOCOL_ERROR, "trailers without END_STREAM")
            self.open.discard(sid)
            events.append(Event("data", sid, None, b"", True))
            return
        self.highest = sid
        if len(self.open) >= self.max_streams:  # the peer ignored our SETTINGS_MAX_CONCURRENT_STREAMS
            self.out += frame(RST_STREAM, 0, sid, _U32.pack(REFUSED_STREAM))
            events.append(Event("refused", sid))
            return
        if not end:
            self.open.add(sid)
        self.answering.add(sid)
        self.stream_recv[sid] = DEFAULT_WINDOW
        self.stream_send[sid] = self.peer_initial
        events.append(Event("headers", sid, headers, b"", end))

    def _table(self) -> tuple[int, int, int, int]:
        """What identifies the decoder's dynamic table: entries are only added at the front and dropped at the
        back, so the same first entry (alive, hence a unique id), count, size and limit mean the same table."""
        t = self.decoder.header_table
        first = id(t.dynamic_entries[0]) if t.dynamic_entries else 0
        return first, len(t.dynamic_entries), t._current_size, t.maxsize

    def _decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """The block's headers. Clients repeat the same blocks call after call; a block that left the dynamic
        table as it was decodes the same way while the table stays so: those are kept (DECODED_KEPT at most)."""
        table = self._table()
        known = self.decoded.get((table, block))
        if known is not None:
            return known
        try:
            headers = [(bytes(k), bytes(v)) for k, v in self.decoder.decode(block, raw=True)]
        except Exception as e:  # noqa: BLE001 - hpack's errors: a broken or oversized block breaks the connection
            raise ProtocolError(PROTOCOL_ERROR, f"header block: {e}") from None
        if self._table() == table:
            if len(self.decoded) >= DECODED_KEPT:
                self.decoded.clear()
            self.decoded[(table, block)] = headers
        return headers

    def _settings(self, flags: int, sid: int, payload: bytes, events: list[Event]) -> None:
        if sid != 0:
            raise ProtocolError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise ProtocolError(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            events.append(Event("settings"))
            return
        if len(payload) % 6:
            raise ProtocolError(FRAME_SIZE_ERROR, "SETTINGS payload not a multiple of 6")
        for i in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, i)
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolError(FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE over 2^31-1")
                delta, self.peer_initial = value - self.peer_initial, value
                for s in self.stream_send:
                    self.stream_send[s] += delta
            elif key == SETTINGS_MAX_FRAME_SIZE:
                if not MAX_FRAME <= value <= (1 << 24) - 1:
                    raise ProtocolError(PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE out of range")
                self.peer_max_frame = value
            elif key == SETTINGS_ENABLE_PUSH and value > 1:
                raise ProtocolError(PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH must be 0 or 1")
        self.settled = True
        self.out += frame(SETTINGS, ACK, 0)
        events.append(Event("settings"))

    def _window(self, sid: int, payload: bytes, events: list[Event]) -> None:
        if len(payload) != 4:
            raise ProtocolError(FRAME_SIZE_ERROR, "WINDOW_UPDATE of other than 4 bytes")
        n = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if n == 0:
            raise ProtocolError(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
        if sid == 0:
            self.send_window += n
            if self.send_window > MAX_WINDOW:
                raise ProtocolError(FLOW_CONTROL_ERROR, "the connection's send window over 2^31-1")
        elif sid in self.stream_send:
            self.stream_send[sid] += n
            if self.stream_send[sid] > MAX_WINDOW:
                raise ProtocolError(FLOW_CONTROL_ERROR, f"stream {sid}'s send window over 2^31-1")
        elif sid > self.highest:
            raise ProtocolError(PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
        events.append(Event("window", sid))
