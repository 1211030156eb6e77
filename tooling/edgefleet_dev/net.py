"""Addresses of the dev cluster: its service and pod ranges, free loopback ports (also for the image builder's
throwaway registry); answering the dev registry's token challenge."""

from __future__ import annotations

import random
import re
import socket
from pathlib import Path

import requests

SERVICE_CIDR = "10.96.0.0/16"
POD_CIDR = "10.244.0.1/16"


def free_port() -> int:
    """A free loopback port below the ephemeral range, so that no client connection's source port takes it
    between now and the caller's bind (ports the kernel hands out for port 0 are in that range)."""
    low = _ephemeral_low()
    for _ in range(50):
        port = random.randint(10000, low - 1)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_low() -> int:
    try:
        return max(10001, int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]))
    except (OSError, ValueError, IndexError):
        return 32768


class RegistryTokenAuth(requests.auth.AuthBase):
    """For a ``requests`` session that talks to a registry with token authentication (the dev cluster's): a 401
    whose Bearer challenge names a realm gets a token for the challenged scope (asked anonymously: the dev
    registry's token service trusts this machine) and the request is sent once more with it."""

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.register_hook("response", self._answer_challenge)
        return request

    def _answer_challenge(self, resp: requests.Response, **kwargs) -> requests.Response:
        challenge = dict(re.findall(r'(\w+)="([^"]*)"', resp.headers.get("WWW-Authenticate", "")))
        if resp.status_code != 401 or "realm" not in challenge or "Authorization" in resp.request.headers:
            return resp
        params = {k: challenge[k] for k in ("service", "scope") if k in challenge}
        answer = requests.get(challenge["realm"], params=params, timeout=30)
        answer.raise_for_status()
        retry = resp.request.copy()
        retry.headers["Authorization"] = f"Bearer {answer.json()['token']}"
        resp.content  # noqa: B018  (read the body so the connection can be reused)
        resp.close()
        again = resp.connection.send(retry, **kwargs)
        again.history.append(resp)
        return again

