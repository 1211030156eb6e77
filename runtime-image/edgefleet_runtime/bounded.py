"""HTTP reads that end: a size cap, a total deadline and redirects that keep the first request's promises.

A socket timeout alone does not end a read: a server that sends one byte a second never trips it. Here a
watchdog shuts the socket down at the deadline, so a body read stops there whatever the server does.
Redirects are followed by hand (at most ``Limits.max_redirects``): never from https to http, never to plain
http unless the caller allows it, and headers that carry credentials are dropped when the host changes.
Errors name the limit that was hit (``LimitExceeded.limit``) and never quote the response body.
"""

from __future__ import annotations

import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

CHUNK = 1 << 16
CREDENTIAL_HEADERS = ("authorization", "proxy-authorization", "cookie")


@dataclass(frozen=True)
class Limits:
    """How much one read may take: bytes, seconds in all, and redirects (0: none followed)."""

    max_bytes: int
    deadline_seconds: float
    max_redirects: int = 5
    connect_seconds: float = 5.0
    read_seconds: float = 30.0  # per socket read; the deadline bounds the whole


class LimitExceeded(RuntimeError):
    """A read hit a limit: ``limit`` is "size", "deadline" or "redirect"."""

    def __init__(self, limit: str, message: str):
        super().__init__(message)
        self.limit = limit


class Deadline:
    """Seconds left until a fixed moment."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds = seconds
        self.clock = clock
        self.end = clock() + seconds

    def left(self) -> float:
        return max(0.0, self.end - self.clock())

    def check(self, what: str) -> None:
        if self.left() <= 0:
            raise LimitExceeded("deadline", f"{what}: not finished within its deadline of {self.seconds:g} s")

    def timeouts(self, limits: Limits) -> tuple[float, float]:
        """(connect, read) socket timeouts that end no later than the deadline."""
        left = max(0.001, self.left())
        return min(limits.connect_seconds, left), min(limits.read_seconds, left)


def safe_url(url: str) -> str:
    """``url`` without user info, query or fragment (they may hold tokens), for messages."""
    p = urllib.parse.urlsplit(url)
    host = p.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{p.port}" if p.port else host
    return urllib.parse.urlunsplit((p.scheme, netloc, p.path, "", ""))


def check_redirect(source: str, target: str, allow_plain_http: bool) -> None:
    """Refuse a redirect from ``source`` to ``target`` that would lower the transport's security."""
    old, new = urllib.parse.urlsplit(source).scheme, urllib.parse.urlsplit(target).scheme
    if new not in ("https", "http"):
        raise LimitExceeded("redirect", f"{safe_url(source)} redirects to a {new or 'relative'}: URL: refused")
    if old == "https" and new != "https":
        raise LimitExceeded("redirect", f"{safe_url(source)} redirects from https to http "
                            f"({safe_url(target)}): refused, a downgrade would expose the request")
    if new == "http" and not allow_plain_http:
        raise LimitExceeded("redirect", f"{safe_url(source)} redirects to plain http ({safe_url(target)}): refused")


def same_host(a: str, b: str) -> bool:
    pa, pb = urllib.parse.urlsplit(a), urllib.parse.urlsplit(b)
    return (pa.scheme, pa.hostname, pa.port) == (pb.scheme, pb.hostname, pb.port)


def without_credentials(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in CREDENTIAL_HEADERS}


def body(resp: Any, limits: Limits, deadline: Deadline, what: str) -> Iterator[bytes]:
    """The body of a streamed ``requests`` response in chunks, at most ``limits.max_bytes`` and ending at the
    deadline (a watchdog shuts the socket down then). Closes the response."""
    raw = resp.raw
    expired = threading.Event()

    def stop() -> None:
        expired.set()
        try:
            raw.shutdown()
        except Exception:  # noqa: BLE001 - already released or closed: the read ends anyway
            pass

    watchdog = threading.Timer(deadline.left(), stop)
    watchdog.daemon = True
    watchdog.start()
    got = 0
    try:
        while True:
            try:
                chunk = raw.read1(CHUNK, decode_content=True)
            except Exception:
                if expired.is_set():
                    break
                raise
            if expired.is_set() or not chunk:
                break
            got += len(chunk)
            if got > limits.max_bytes:
                raise LimitExceeded("size", f"{what}: larger than its size cap of {limits.max_bytes} bytes")
            yield chunk
    finally:
        watchdog.cancel()
        resp.close()
    if expired.is_set():
        raise LimitExceeded("deadline", f"{what}: not finished within its deadline of {deadline.seconds:g} s "
                            f"({got} bytes read)")


def get(url: str, limits: Limits, *, headers: dict[str, str] | None = None, allow_plain_http: bool = False,
        session: Any = None, deadline: Deadline | None = None) -> Iterator[bytes]:
    """GET ``url`` and yield its body within ``limits``; raises LimitExceeded or ``HTTPStatusError``."""
    import requests

    deadline = deadline or Deadline(limits.deadline_seconds)
    session = session or requests.Session()
    headers = dict(headers or {})
    resp = _follow(session, url, limits, headers, allow_plain_http, deadline)
    yield from body(resp, limits, deadline, f"GET {safe_url(url)}")


class HTTPStatusError(RuntimeError):
    """The server answered with a status other than 200 (the body is not quoted)."""

    def __init__(self, url: str, status: int):
        super().__init__(f"GET {safe_url(url)} answered HTTP {status}")
        self.status = status


def _follow(session: Any, url: str, limits: Limits, headers: dict[str, str], allow_plain_http: bool,
            deadline: Deadline) -> Any:
    """The first non-redirect answer to GET ``url``, following redirects by the rules above."""
    import requests

    first, current = url, url
    for hop in range(limits.max_redirects + 1):
        deadline.check(f"GET {safe_url(first)}")
        try:
            resp = session.get(current, headers=headers, stream=True, allow_redirects=False,
                               timeout=deadline.timeouts(limits))
        except requests.Timeout as e:
            deadline.check(f"GET {safe_url(first)}")
            raise LimitExceeded("deadline", f"GET {safe_url(current)}: no answer within {limits.read_seconds:g} s "
                                "per read") from e
        if not resp.is_redirect:
            if resp.status_code != 200:
                resp.close()
                raise HTTPStatusError(current, resp.status_code)
            return resp
        target = urllib.parse.urljoin(current, resp.headers.get("location", ""))
        resp.close()
        if hop == limits.max_redirects:
            break
        check_redirect(current, target, allow_plain_http)
        if not same_host(current, target):
            headers = without_credentials(headers)  # credentials never follow to another host
        current = target
    what = "redirects are not followed" if limits.max_redirects == 0 else f"more than {limits.max_redirects} redirects"
    raise LimitExceeded("redirect", f"GET {safe_url(first)}: {what}")


def read_all(url: str, limits: Limits, **kwargs: Any) -> bytes:
    """The whole body of ``url`` within ``limits`` (see ``get``)."""
    return b"".join(get(url, limits, **kwargs))


def guard_session(session: Any, limits: Limits, deadline: Deadline, allow_plain_http: bool) -> None:
    """Make a ``requests`` session that another client drives (ORAS) keep these rules: every request times out
    no later than the deadline, and a redirect is refused when it lowers security (requests itself drops
    Authorization on a change of host)."""
    session.max_redirects = limits.max_redirects
    plain = session.request

    def request(method: str, url: str, **kwargs: Any) -> Any:
        deadline.check(f"{method} {safe_url(url)}")
        return plain(method, url, **{**kwargs, "timeout": deadline.timeouts(limits)})

    def redirect_hook(resp: Any, *args: Any, **kwargs: Any) -> Any:
        if resp.is_redirect:
            check_redirect(resp.url, urllib.parse.urljoin(resp.url, resp.headers.get("location", "")),
                           allow_plain_http)
        return resp

    session.request = request
    session.hooks.setdefault("response", []).append(redirect_hook)
