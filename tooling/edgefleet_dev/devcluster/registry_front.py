"""The dev registry's front door: the store's token service (edgefleet.registry_token) at ``/token`` and the CNCF
distribution registry behind it, on one address.

The registry runs with token authentication and ``autoredirect``, so its challenge names ``/token`` on whatever
host:port the client used (127.0.0.1 from the host, the node IP from pods): every client reaches the realm the way
it reached the registry, and crane (which refuses token realms on other private addresses) accepts it. Everything
else is streamed to the registry unchanged (Host kept, so its upload Locations point back here).
"""

from __future__ import annotations

import argparse
import http.client
import shutil
from http.server import ThreadingHTTPServer
from typing import Any

from edgefleet.registry_token import Policy, TokenService, handler_for, kubernetes_reviewer

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
CHUNK = 1 << 20
UPSTREAM_SECONDS = 300.0
MAX_CHUNK_LINE = 1024


def front_handler(tokens: TokenService, upstream: str) -> type:
    host, _, port = upstream.rpartition(":")

    class Front(handler_for(tokens)):  # type: ignore[misc]
        protocol_version = "HTTP/1.1"  # keep-alive: clients push many blobs over one connection

        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] == "/token":
                return super().do_GET()
            self._proxy()

        do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = lambda self: self._proxy()  # noqa: E731

        def _proxy(self) -> None:
            upstream_conn = http.client.HTTPConnection(host, int(port), timeout=UPSTREAM_SECONDS)
            try:
                self._forward(upstream_conn)
            finally:
                upstream_conn.close()

        def _forward(self, conn: http.client.HTTPConnection) -> None:
            chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in HOP_BY_HOP and name.lower() != "x-forwarded-proto":
                    conn.putheader(name, value)
            conn.putheader("X-Forwarded-Proto", "http")
            if chunked:
                conn.putheader("Content-Length", str(self._spool_chunked()))
                conn.endheaders()
                self._spooled.seek(0)
                shutil.copyfileobj(self._spooled, conn.sock, CHUNK)  # type: ignore[arg-type]
            else:
                conn.endheaders()
                self._copy(int(self.headers.get("Content-Length") or 0), conn)
            self._answer_from(conn.getresponse())

        def _copy(self, length: int, conn: http.client.HTTPConnection) -> None:
            while length > 0:
                data = self.rfile.read(min(CHUNK, length))
                if not data:
                    raise ConnectionError("the client closed the connection mid-body")
                conn.send(data)
                length -= len(data)

        def _spool_chunked(self) -> int:
            """A chunked request body, de-chunked into a temporary file; its length."""
            import tempfile

            self._spooled: Any = tempfile.TemporaryFile()
            total = 0
            while True:
                size = int(self.rfile.readline(MAX_CHUNK_LINE).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(MAX_CHUNK_LINE).strip():  # trailers
                        pass
                    return total
                self._spooled.write(self.rfile.read(size))
                self.rfile.readline(MAX_CHUNK_LINE)
                total += size

        def _answer_from(self, resp: http.client.HTTPResponse) -> None:
            self.send_response_only(resp.status, resp.reason)
            length = resp.getheader("Content-Length")
            for name, value in resp.getheaders():
                if name.lower() not in HOP_BY_HOP:
                    self.send_header(name, value)
            bodyless = self.command == "HEAD" or resp.status in (204, 304)
            if length is None and not bodyless:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if bodyless:
                return
            while data := resp.read(CHUNK):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if length is None else data)
            if length is None:
                self.wfile.write(b"0\r\n\r\n")

    return Front


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", required=True, help="HOST:PORT clients use as the registry")
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the distribution registry")
    parser.add_argument("--key", required=True, help="ES256 private key (PEM) the tokens are signed with")
    parser.add_argument("--policy", required=True, help="edgefleet.registry_token policy (YAML)")
    parser.add_argument("--service", required=True)
    parser.add_argument("--kubeconfig", required=True)
    args = parser.parse_args()
    with open(args.key, "rb") as fh:
        key = fh.read()
    tokens = TokenService(key, args.service, "edgefleet", Policy.load(args.policy),
                          kubernetes_reviewer(args.kubeconfig))
    host, _, port = args.listen.rpartition(":")
    server = ThreadingHTTPServer((host, int(port)), front_handler(tokens, args.upstream))
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
