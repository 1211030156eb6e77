"""The model repository extension (``/v2/repository/...``): off unless the operator of the node turns it on.

Safe on an open network:

* off by default: the routes answer 404 and say how to turn them on;
* on the serving port only with a bearer token read from a file (a mounted Secret), compared in constant
  time; or on a separate listener bound to loopback (``--management-port``), token optional there;
* ``load`` takes only a digest and loads ``CACHE/sha256/<hex>``: never a caller's path, and a cached file
  that does not match its name is refused without saying what its digest is.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
from typing import TYPE_CHECKING

import orjson

from .backends import ModelLoadError
from .digest import DigestError, blob_path, parse_digest
from .tensors import RequestError
from .trust import TrustError

if TYPE_CHECKING:
    from .app import ModelSlot

Reply = tuple[int, list[tuple[str, str]], bytes]  # status, headers, body

log = logging.getLogger("edgefleet_runtime")

JSON = [("Content-Type", "application/json")]
OFF_MESSAGE = (
    "the management API is off; start the server with --management-token-file FILE (bearer token) "
    "or --management-port N (loopback only) and --cache DIR"
)


class ManagementError(ValueError):
    """A management setting the server cannot start with."""


def read_token(path: str) -> bytes:
    """The bearer token in ``path`` (surrounding whitespace dropped); raise ManagementError if unusable."""
    try:
        with open(path, "rb") as f:
            token = f.read(4096).strip()
    except OSError as e:
        raise ManagementError(f"--management-token-file {path}: {e.strerror or e}") from None
    if len(token) < 16:
        raise ManagementError(
            f"--management-token-file {path}: the token must be at least 16 characters (e.g. `openssl rand -hex 32`)"
        )
    if not token.isascii() or any(c <= 0x20 or c == 0x7F for c in token):
        raise ManagementError(f"--management-token-file {path}: the token must be printable ASCII without spaces")
    return token


def _file_version(path: str) -> tuple[int, int, int] | None:
    """What changes when the file is replaced or rewritten (a Secret update swaps a symlink): None if unreadable."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class Management:
    """Answers ``/v2/repository/...`` for one model slot; ``token`` None means no authentication needed.
    With ``token_file``, the token is read again whenever the file changes (a rotated Secret); a file that
    becomes unusable refuses every request (503 naming the problem) until it is fixed."""

    def __init__(self, slot: ModelSlot, token: bytes | None, token_file: str | None = None):
        if not slot.cache_dir:
            raise ManagementError("the management API needs --cache DIR: it loads only models in the node cache")
        self.slot = slot
        self.cache_dir: str = slot.cache_dir
        self.token = token
        self.token_file = token_file
        self._token_version = _file_version(token_file) if token_file else None
        self._token_error: str | None = None
        self._lock = threading.Lock()

    def _current_token(self) -> bytes | None:
        if self.token_file is None:
            return self.token
        version = _file_version(self.token_file)
        with self._lock:
            if version != self._token_version:
                self._token_version = version
                try:
                    self.token, self._token_error = read_token(self.token_file), None
                except ManagementError as e:
                    self._token_error = str(e)
                log.info("management token file changed", extra={"usable": self._token_error is None})
            if self._token_error is not None:
                raise RequestError(503, f"the management API is unavailable: {self._token_error}")
            return self.token

    def authorized(self, headers: dict[str, str]) -> bool:
        token = self._current_token()
        if token is None:
            return True
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode("latin-1"), token)

    def handle(self, method: str, rest: list[str], headers: dict[str, str], body: bytes | bytearray) -> Reply:
        if not self.authorized(headers):
            raise RequestError(
                401, "the management API needs the header Authorization: Bearer <token from --management-token-file>"
            )
        if method != "POST":
            raise RequestError(405, f"method {method} is not allowed here; use POST")
        if rest == ["index"]:
            return 200, JSON, orjson.dumps(self._index())
        if len(rest) == 3 and rest[0] == "models" and rest[2] in ("load", "unload"):
            return self._load_or_unload(rest[1], rest[2], body)
        raise RequestError(404, f"no repository route /v2/repository/{'/'.join(rest)}")

    def _index(self) -> list[dict[str, str]]:
        m = self.slot.current
        if m is None:
            return []
        return [{"name": m.name, "version": m.version, "state": "READY", "reason": ""}]

    def _load_or_unload(self, name: str, action: str, body: bytes | bytearray) -> Reply:
        if name != self.slot.name:
            raise RequestError(404, f"unknown model '{name}'; this server serves '{self.slot.name}'")
        if action == "unload":
            raise RequestError(400, "unload is not supported: this server always serves one model")
        digest = _digest_parameter(body)
        path = blob_path(self.cache_dir, digest)
        if not os.path.isfile(path):
            raise RequestError(
                404, f"parameters.digest {digest} is not in the node cache; fetch it first (edgefleet-runtime fetch)"
            )
        try:
            model = self.slot.load(str(path), digest)
        except DigestError:
            raise RequestError(
                409, f"the node cache's file for {digest} does not match that digest; fetch it again"
            ) from None
        except TrustError as e:  # unsigned, wrongly signed, or not decryptable with this server's key
            raise RequestError(403, f"refused ({e.reason}): {e}") from None
        except ModelLoadError as e:
            raise RequestError(422, str(e)) from None
        return 200, JSON, orjson.dumps({"name": model.name, "version": model.version, "digest": model.digest})


def _digest_parameter(body: bytes | bytearray) -> str:
    try:
        req = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError as e:
        raise RequestError(400, f"malformed JSON in request body: {e}") from None
    params = req.get("parameters") if isinstance(req, dict) else None
    if not isinstance(params, dict) or not isinstance(params.get("digest"), str):
        raise RequestError(
            400, 'parameters.digest is required: load takes {"parameters": {"digest": "sha256:<64 hex>"}}'
        )
    unknown = sorted(set(params) - {"digest"})
    if unknown:
        raise RequestError(
            400, f"parameters.{unknown[0]} is not accepted: load takes only the digest of a model in the node cache"
        )
    try:
        return "sha256:" + parse_digest(params["digest"])
    except DigestError as e:
        raise RequestError(400, f"parameters.digest: {e}") from None
