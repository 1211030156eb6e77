"""`edgefleet registry-token-server`: the artifact store's token service, so the store never needs anonymous pushes.

It speaks the distribution token protocol (https://distribution.github.io/distribution/spec/auth/token/): the
registry answers an unauthenticated request with ``WWW-Authenticate: Bearer realm=...,scope=...``, the client asks
this service for a token for that scope, and the registry checks the token's ``access`` claims. Every caller gets the
requested actions it is allowed, no more:

- anonymous callers: the policy's ``anonymous`` actions (default: pull) on every repository;
- a trusted address (the development host only; empty by default): every action it asks for;
- a Kubernetes ServiceAccount: HTTP Basic with username ``serviceaccount`` and, as password, a projected
  ServiceAccount token whose audience is the service name. The API server verifies it (TokenReview); the
  ServiceAccount's namespace and name and the pod's node (bound into the token by the API server) choose the
  policy rules and fill their ``{namespace}``, ``{name}`` and ``{node}`` placeholders, so a node can be given a
  repository of its own.

Credentials that do not verify are refused (401), never downgraded to anonymous. Tokens are ES256 JWTs signed with
``--key``; the registry trusts the matching JWKS (``--write-jwks``).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import secrets
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import click
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

SERVICE_ACCOUNT_USER = "serviceaccount"  # the Basic username that marks a projected ServiceAccount token
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
SA_PREFIX = "system:serviceaccount:"
TOKEN_SECONDS = 300
MAX_SCOPES = 16
MAX_CONCURRENT = 32
REQUEST_SECONDS = 10.0
ACTIONS = ("pull", "push", "delete")


class RulePolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    serviceAccount: str = Field(pattern=r"^[a-z0-9*-]+/[a-z0-9*.-]+$",
                                description="NAMESPACE/NAME of the ServiceAccount, `*` as a wildcard")
    repositories: list[str] = Field(min_length=1, description="repository patterns ({namespace} {name} {node}, *)")
    actions: list[str] = Field(min_length=1)
    requireNode: bool = Field(False, description="only tokens bound to a pod on a node")


class PolicyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    anonymous: list[str] = ["pull"]
    trustedAddresses: list[str] = []
    rules: list[RulePolicy] = []


@dataclass(frozen=True)
class Identity:
    subject: str
    namespace: str = ""
    name: str = ""
    node: str = ""
    trusted: bool = False


ANONYMOUS = Identity("anonymous")


@dataclass(frozen=True)
class Policy:
    anonymous: frozenset[str] = frozenset({"pull"})
    trusted_addresses: frozenset[str] = frozenset()
    rules: tuple[RulePolicy, ...] = ()

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        try:
            raw = PolicyFile.model_validate(yaml.safe_load(Path(path).read_text()) or {})
        except (OSError, yaml.YAMLError, ValidationError) as e:
            raise click.UsageError(f"--policy {path}: {e}") from e
        for action in [*raw.anonymous, *(a for r in raw.rules for a in r.actions)]:
            if action not in ACTIONS:
                raise click.UsageError(f"--policy {path}: unknown action {action!r}; one of {', '.join(ACTIONS)}")
        return cls(frozenset(raw.anonymous), frozenset(raw.trustedAddresses), tuple(raw.rules))

    def allowed(self, who: Identity, repository: str) -> set[str]:
        """The actions ``who`` may take on ``repository``."""
        if who.trusted:
            return set(ACTIONS)
        actions = set(self.anonymous)
        if not who.namespace:
            return actions
        for rule in self.rules:
            if _rule_applies(rule, who) and any(
                    fnmatch.fnmatchcase(repository, _fill(p, who)) for p in rule.repositories):
                actions.update(rule.actions)
        return actions

    def grant(self, who: Identity, scopes: list[str]) -> list[dict[str, Any]]:
        """The ``access`` claim for ``scopes`` (``repository:NAME:ACTIONS``): each repository with the requested
        actions ``who`` may take, and pull and push whenever ``who`` may take them there (ORAS keeps the first
        token it gets and sends it again when a push follows a pull); repositories with none are left out."""
        access = []
        for scope in scopes[:MAX_SCOPES]:
            kind, _, rest = scope.partition(":")
            name, _, wanted = rest.rpartition(":")
            if kind != "repository" or not name:
                continue
            actions = sorted((set(wanted.split(",")) | {"pull", "push"}) & self.allowed(who, name))
            if actions:
                access.append({"type": "repository", "name": name, "actions": actions})
        return access


def _rule_applies(rule: RulePolicy, who: Identity) -> bool:
    if rule.requireNode and not who.node:
        return False
    return fnmatch.fnmatchcase(f"{who.namespace}/{who.name}", rule.serviceAccount)


def _fill(pattern: str, who: Identity) -> str:
    """The pattern with the identity's values; a placeholder without a value matches nothing."""
    for key, value in (("{namespace}", who.namespace), ("{name}", who.name), ("{node}", who.node)):
        if key in pattern:
            if not value:
                return "\0"
            pattern = pattern.replace(key, value)
    return pattern


class Refused(Exception):
    """Credentials that do not verify: answered 401."""


Reviewer = Callable[[str, str], dict[str, Any]]  # (token, audience) -> TokenReview status as a dict


def kubernetes_reviewer(kubeconfig: str | None) -> Reviewer:
    """A TokenReview through the Kubernetes API (in-cluster config without ``kubeconfig``)."""
    from kubernetes import client, config

    if kubeconfig:
        api_client = config.new_client_from_config(config_file=kubeconfig)
    else:
        config.load_incluster_config()
        api_client = client.ApiClient()
    api = client.AuthenticationV1Api(api_client)

    def review(token: str, audience: str) -> dict[str, Any]:
        body = client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token, audiences=[audience]))
        result = api.create_token_review(body, _request_timeout=REQUEST_SECONDS)
        return api_client.sanitize_for_serialization(result.status) or {}

    return review


def service_account_identity(status: dict[str, Any], audience: str) -> Identity:
    """The identity a TokenReview status proves, or Refused."""
    if not status.get("authenticated") or audience not in (status.get("audiences") or [audience]):
        raise Refused("the ServiceAccount token does not verify for this service")
    user = status.get("user") or {}
    username = user.get("username", "")
    if not username.startswith(SA_PREFIX) or username.count(":") != 3:
        raise Refused("only ServiceAccount tokens are accepted")
    namespace, name = username[len(SA_PREFIX):].split(":")
    nodes = (user.get("extra") or {}).get(NODE_NAME_EXTRA) or [""]
    return Identity(username, namespace, name, nodes[0])


@dataclass
class TokenService:
    key_pem: bytes
    service: str
    issuer: str
    policy: Policy
    review: Reviewer
    seconds: int = TOKEN_SECONDS
    kid: str = field(init=False)

    def __post_init__(self) -> None:
        self._key = signing_key(self.key_pem)
        self.kid = key_id(self._key.public_key())

    def identify(self, authorization: str | None, address: str) -> Identity:
        if not authorization:
            return Identity("host", trusted=True) if address in self.policy.trusted_addresses else ANONYMOUS
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "basic":
            raise Refused("expected HTTP Basic credentials")
        try:
            user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
        except ValueError as e:
            raise Refused("malformed Basic credentials") from e
        if user != SERVICE_ACCOUNT_USER or not password:
            raise Refused(f"unknown user; send username {SERVICE_ACCOUNT_USER!r} and a ServiceAccount token")
        return service_account_identity(self.review(password, self.service), self.service)

    def issue(self, who: Identity, scopes: list[str]) -> dict[str, Any]:
        import jwt

        now = int(time.time())
        claims = {"iss": self.issuer, "sub": who.subject, "aud": self.service, "iat": now, "nbf": now - 5,
                  "exp": now + self.seconds, "jti": secrets.token_hex(16), "access": self.policy.grant(who, scopes)}
        token = jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": self.kid})
        return {"token": token, "access_token": token, "expires_in": self.seconds,
                "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))}


def signing_key(key_pem: bytes) -> Any:
    """The EC P-256 private key in ``key_pem`` (ES256 is what the tokens are signed with); ValueError otherwise."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError("the token signing key must be an EC P-256 private key (PEM)")
    return key


def key_id(public_key: Any) -> str:
    """The RFC 7638 thumbprint of an EC P-256 key (how the registry names keys of its JWKS)."""
    numbers = public_key.public_numbers()
    x, y = (base64.urlsafe_b64encode(n.to_bytes(32, "big")).rstrip(b"=").decode() for n in (numbers.x, numbers.y))
    canonical = json.dumps({"crv": "P-256", "kty": "EC", "x": x, "y": y}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


def jwks(key_pem: bytes) -> dict[str, Any]:
    """The JWKS the registry trusts (``auth.token.jwks``) for tokens signed with ``key_pem``."""
    import jwt

    public = signing_key(key_pem).public_key()
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public))
    return {"keys": [{**jwk, "kid": key_id(public), "alg": "ES256", "use": "sig"}]}


def new_key() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def handler_for(tokens: TokenService) -> type[BaseHTTPRequestHandler]:
    slots = threading.BoundedSemaphore(MAX_CONCURRENT)

    class Handler(BaseHTTPRequestHandler):
        timeout = REQUEST_SECONDS
        server_version = "edgefleet-registry-token"

        def do_GET(self) -> None:
            if not slots.acquire(blocking=False):
                return self._answer(503, {"errors": [{"code": "TOOMANYREQUESTS", "message": "busy, retry"}]})
            try:
                self._token()
            finally:
                slots.release()

        def _token(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query)
            if url.path != "/token":
                return self._answer(404, {"errors": [{"code": "NOT_FOUND", "message": "GET /token"}]})
            if query.get("service", [tokens.service]) != [tokens.service]:
                return self._answer(400, {"errors": [{"code": "INVALID", "message": "unknown service"}]})
            scopes = [s for value in query.get("scope", []) for s in value.split(" ") if s]
            try:
                who = tokens.identify(self.headers.get("Authorization"), self.client_address[0])
            except Refused as e:
                return self._answer(401, {"errors": [{"code": "UNAUTHORIZED", "message": str(e)}]})
            except Exception:  # the API server could not review the token
                return self._answer(503, {"errors": [{"code": "UNAVAILABLE", "message": "token review failed"}]})
            self._answer(200, tokens.issue(who, scopes))

        def _answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # access log off: requests carry credentials
            pass

    return Handler


def serve(tokens: TokenService, host: str, port: int) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), handler_for(tokens))
    server.daemon_threads = True
    return server


@click.command("registry-token-server")
@click.option("--key", "key_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="ES256 private key (PEM) the tokens are signed with")
@click.option("--policy", "policy_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="YAML: anonymous actions, trusted addresses, ServiceAccount rules")
@click.option("--service", default="edgefleet-registry", show_default=True,
              help="the registry's auth.token.service, also the ServiceAccount tokens' audience")
@click.option("--issuer", default="edgefleet", show_default=True, help="the registry's auth.token.issuer")
@click.option("--listen", default="127.0.0.1:5001", show_default=True, help="HOST:PORT")
@click.option("--kubeconfig", default=None, help="for TokenReview (default: in-cluster)")
@click.option("--write-jwks", type=click.Path(dir_okay=False), default=None,
              help="write the JWKS for the registry's auth.token.jwks and exit")
def registry_token_command(key_path: str, policy_path: str, service: str, issuer: str, listen: str,
                           kubeconfig: str | None, write_jwks: str | None) -> None:
    """Issue registry tokens: anonymous pull, pushes only to the repositories the policy gives each
    ServiceAccount."""
    key_pem = Path(key_path).read_bytes()
    if write_jwks:
        Path(write_jwks).write_text(json.dumps(jwks(key_pem)))
        return
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise click.BadParameter(f"{listen!r}: expected HOST:PORT", param_hint="--listen")
    tokens = TokenService(key_pem, service, issuer, Policy.load(policy_path), kubernetes_reviewer(kubeconfig))
    server = serve(tokens, host, int(port))
    click.echo(f"registry tokens for {service!r} on http://{listen}/token", err=True)
    server.serve_forever()


if __name__ == "__main__":  # the dev cluster starts it as `python -m edgefleet.registry_token`
    registry_token_command()
