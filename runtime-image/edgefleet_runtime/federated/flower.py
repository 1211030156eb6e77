"""Flower (flwr) server and client for head fine-tuning, over gRPC with mutual TLS.

Flower's legacy bidirectional transport (the FlowerService.Join stream), its server loop and client
manager are used as they are. Ours: the channel (the server requires a client certificate signed by the
run's CA, `require_client_auth=True`, which Flower's own `start_server` leaves off), the admission (each
client's certificate names it; an identity joins once, and at most the run's clients join) and the
aggregation (`robust`: updates screened, then FedAvg, TrimmedMean or Median). Only Flower's FitIns/FitRes
messages (the head's parameters and a few numbers) cross the network; every message a client sends is counted.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import numpy as np
from flwr.client import NumPyClient
from flwr.common import (
    Code,
    EvaluateRes,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
    serde,
)
from flwr.proto.transport_pb2 import ClientMessage, Reason  # pylint: disable=no-name-in-module
from flwr.proto.transport_pb2_grpc import FlowerServiceStub, add_FlowerServiceServicer_to_server
from flwr.server import Server
from flwr.server.client_manager import SimpleClientManager
from flwr.server.strategy import FedAvg, FedProx
from flwr.server.superlink.fleet.grpc_bidi.flower_service_servicer import FlowerServiceServicer
from flwr.server.superlink.fleet.grpc_bidi.grpc_client_proxy import GrpcClientProxy

from . import robust
from .robust import Limits, Refusal, Update
from .trainer import Head, loss_and_accuracy, train

log = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 64 * 2**20


class RoundFailed(RuntimeError):
    """A round could not complete with at least the minimum number of clients (`refused`: whose updates were
    refused in it)."""

    def __init__(self, message: str, refused: list[Refusal] | None = None):
        super().__init__(message)
        self.refused = refused or []


@dataclass(frozen=True)
class Tls:
    """PEM bytes: the run's CA certificate, and this side's certificate and private key."""

    ca: bytes
    cert: bytes
    key: bytes


# ----------------------------------------------------------------------------- client side
class HeadClient(NumPyClient):
    """Trains the head on this client's features; its data never leaves this object."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, seed: int = 0):
        self.x, self.y, self.seed = features, labels, seed

    def get_parameters(self, config):
        raise RuntimeError("the server starts from the source model's head; it never asks a client")

    def fit(self, parameters, config):
        head = train(Head.of(parameters), self.x, self.y, epochs=int(config.get("epochs", 5)),
                     learning_rate=float(config.get("learningRate", 0.5)),
                     batch_size=int(config.get("batchSize", 32)),
                     proximal_mu=float(config.get("proximal_mu", 0.0)), seed=self.seed)
        loss, acc = loss_and_accuracy(head, self.x, self.y)
        return head.parameters(), len(self.y), {"trainLoss": loss, "trainAccuracy": acc}

    def evaluate(self, parameters, config):
        loss, acc = loss_and_accuracy(Head.of(parameters), self.x, self.y)
        return loss, len(self.y), {"accuracy": acc}


@dataclass
class Traffic:
    """What a client sent: one entry per message, (kind, serialized bytes)."""

    sent: list[tuple[str, int]] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)  # kept only when keep_messages is set
    keep_messages: bool = False

    def record(self, kind: str, msg: ClientMessage) -> None:
        data = msg.SerializeToString()
        self.sent.append((kind, len(data)))
        if self.keep_messages:
            self.messages.append(data)


# numpy reads an .npy header with ast.literal_eval, which CPython 3.11.7 cannot run on two threads at once
# ("AST constructor recursion depth mismatch", gh-106905): seen with the clients and the server in one process.
_DECODE = threading.Lock()


def decode(parameters: Parameters) -> list[np.ndarray]:
    """Flower's parameters_to_ndarrays (np.load, allow_pickle=False), one thread at a time."""
    with _DECODE:
        return parameters_to_ndarrays(parameters)


def _reply(client, server_msg, traffic: Traffic) -> ClientMessage | None:
    kind = server_msg.WhichOneof("msg")
    if kind == "fit_ins":  # what Flower's NumPyClient wrapper does, with the decode above
        ins = serde.fit_ins_from_proto(server_msg.fit_ins)
        params, n, metrics = client.fit(decode(ins.parameters), ins.config)
        res = FitRes(Status(Code.OK, "Success"), ndarrays_to_parameters(params), n, metrics)
        msg = ClientMessage(fit_res=serde.fit_res_to_proto(res))
    elif kind == "evaluate_ins":
        eval_ins = serde.evaluate_ins_from_proto(server_msg.evaluate_ins)
        loss, n, metrics = client.evaluate(decode(eval_ins.parameters), eval_ins.config)
        msg = ClientMessage(evaluate_res=serde.evaluate_res_to_proto(EvaluateRes(Status(Code.OK, "Success"),
                                                                                 float(loss), n, metrics)))
    elif kind == "reconnect_ins":
        msg = ClientMessage(disconnect_res=ClientMessage.DisconnectRes(reason=Reason.ACK))
    else:
        raise RuntimeError(f"the server sent {kind}, which this client does not answer")
    traffic.record(kind, msg)
    return None if kind == "reconnect_ins" else msg


def run_client(address: str, client: NumPyClient, tls: Tls, traffic: Traffic | None = None,
               server_name: str | None = None, on_message: Callable[[str], None] | None = None) -> Traffic:
    """Join the server at `address` and answer until it says goodbye; returns what was sent."""
    traffic = traffic or Traffic()
    creds = grpc.ssl_channel_credentials(root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert)
    options: list[tuple[str, int | str]] = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    with grpc.secure_channel(address, creds, options=options) as channel:
        grpc.channel_ready_future(channel).result(timeout=300)
        outbox: queue.Queue = queue.Queue(maxsize=1)
        for server_msg in FlowerServiceStub(channel).Join(iter(outbox.get, None)):
            reply = _reply(client, server_msg, traffic)
            if on_message:
                on_message(server_msg.WhichOneof("msg"))
            if reply is None:
                break
            outbox.put(reply)
        outbox.put(None)
    return traffic


# ----------------------------------------------------------------------------- server side
@dataclass
class RoundResult:
    round: int
    clients: int
    failures: int
    loss: float
    accuracy: float
    train_loss: float | None = None
    bytes_per_client: list[int] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    clipped: list[str] = field(default_factory=list)  # clients whose reported sample count was capped


class Admission:
    """Who may join: each client's certificate names it (CN), an identity joins once (a second connection with
    the same certificate, such as a copied key, is refused), and at most `max_clients` identities join."""

    def __init__(self, max_clients: int = 0, on_refusal: Callable[[Refusal], None] = lambda r: None):
        self.max_clients, self.on_refusal = max_clients, on_refusal
        self.joined: list[str] = []
        self._lock = threading.Lock()

    def admit(self, identity: str, peer: str) -> Refusal | None:
        with self._lock:
            if not identity:
                refusal = Refusal(f"peer {peer}", "NoIdentity", "its certificate has no common name")
            elif identity in self.joined:
                refusal = Refusal(identity, "DuplicateIdentity", f"a second connection (from {peer}) presented the "
                                  "certificate of a client that already joined this run; an identity joins once")
            elif self.max_clients and len(self.joined) >= self.max_clients:
                refusal = Refusal(identity, "TooManyClients", f"the run admitted {self.max_clients} clients, "
                                  f"all joined already ({peer} refused)")
            else:
                self.joined.append(identity)
                return None
        self.on_refusal(refusal)
        return refusal


def peer_identity(context: grpc.ServicerContext) -> str:
    """The common name of the client's verified certificate ('' when it has none)."""
    names = context.auth_context().get("x509_common_name") or [b""]
    return names[0].decode(errors="replace")


class IdentityServicer(FlowerServiceServicer):
    """Flower's Join, with the client's certificate name as its Flower id (so refusals name it), after
    `admission` let it in; a refused client gets PERMISSION_DENIED with the reason."""

    def __init__(self, client_manager, admission: Admission):
        self._joining = threading.local()  # gRPC runs a stream's first step in the thread that called Join
        super().__init__(client_manager, grpc_client_proxy_factory=self._proxy)
        self.admission = admission

    def _proxy(self, cid: str, bridge) -> GrpcClientProxy:
        return GrpcClientProxy(cid=getattr(self._joining, "identity", cid), bridge=bridge)

    def Join(self, request_iterator, context):  # noqa: N802 - gRPC's method name
        identity = peer_identity(context)
        refusal = self.admission.admit(identity, context.peer())
        if refusal is not None:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{refusal.client}: {refusal.reason}: {refusal.message}")
        self._joining.identity = identity
        yield from super().Join(request_iterator, context)


class BoundedClientManager(SimpleClientManager):
    """Before the first round waits up to `wait_seconds` for all `expected` clients (they start at about the
    same time); every round needs at least the minimum within `wait_seconds`, else it fails clearly."""

    def __init__(self, wait_seconds: float, expected: int = 0):
        super().__init__()
        self.wait_seconds, self.expected = wait_seconds, expected

    def sample(self, num_clients, min_num_clients=None, criterion=None):
        need = min_num_clients or num_clients
        if self.expected:
            self.wait_for(self.expected, timeout=int(self.wait_seconds))
            self.expected = 0
            num_clients = max(num_clients, self.num_available())
        if not self.wait_for(need, timeout=int(self.wait_seconds)):
            raise RoundFailed(f"only {self.num_available()} of the minimum {need} clients connected "
                              f"within {self.wait_seconds:.0f} s")
        return super().sample(num_clients, min_num_clients, criterion)


def make_strategy(aggregation: str, *, min_clients: int, initial: Head, eval_x: np.ndarray, eval_y: np.ndarray,
                  fit_config: dict, proximal_mu: float = 0.0, limits: Limits | None = None,
                  trim_fraction: float = robust.DEFAULT_TRIM_FRACTION,
                  on_round: Callable[[RoundResult], None] = lambda r: None):
    """A Flower strategy that starts from `initial`, screens each round's updates (`robust.screen` with
    `limits`), combines the accepted ones with `aggregation` (FedAvg, FedProx, TrimmedMean or Median), evaluates
    on the server's evaluation data, refuses a round with fewer than `min_clients` accepted updates and reports
    every round to `on_round`."""
    if aggregation not in robust.STRATEGIES:
        raise ValueError(f"aggregation {aggregation!r}: use one of {', '.join(robust.STRATEGIES)}")
    base = FedProx if aggregation == "FedProx" else FedAvg  # FedProx differs on the clients only
    limits = limits or Limits()

    class Screening(base):  # type: ignore[valid-type,misc]  # FedAvg or FedProx, chosen above
        pending: dict = {}
        start: list[np.ndarray] = initial.parameters()

        def configure_fit(self, server_round, parameters, client_manager):
            self.start = decode(parameters)
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            updates, undecodable = _updates(results, server_round)
            screened = robust.screen(updates, self.start, limits, server_round)
            refused = undecodable + screened.refused
            accepted = screened.accepted
            if len(accepted) < min_clients:
                raise RoundFailed(f"round {server_round}: {len(accepted)} clients returned an update"
                                  f"{_refused_text(refused)}, {len(failures)} failed; the minimum is {min_clients}",
                                  refused)
            self.pending = {"clients": len(accepted), "failures": len(failures), "refused": refused,
                            "clipped": screened.clipped,
                            "bytes": [serde.fit_res_to_proto(r).ByteSize() for _, r in results],
                            "train_loss": _train_loss(results, accepted)}
            return ndarrays_to_parameters(robust.aggregate(aggregation, accepted, trim_fraction)), {}

        def evaluate(self, server_round, parameters):  # FedAvg's, with the decode above
            loss, metrics = evaluate_fn(server_round, decode(parameters), {})
            if server_round > 0:
                p = self.pending
                on_round(RoundResult(server_round, p["clients"], p["failures"], loss, metrics["accuracy"],
                                     p["train_loss"], p["bytes"], p["refused"], p["clipped"]))
            return loss, metrics

    def evaluate_fn(server_round, params, config):
        loss, acc = loss_and_accuracy(Head.of(params), eval_x, eval_y)
        return loss, {"accuracy": acc}

    kwargs = {"proximal_mu": proximal_mu} if aggregation == "FedProx" else {}
    return Screening(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=min_clients,
                     min_evaluate_clients=0, min_available_clients=min_clients, evaluate_fn=evaluate_fn,
                     on_fit_config_fn=lambda r: dict(fit_config), accept_failures=True,
                     initial_parameters=ndarrays_to_parameters(initial.parameters()), **kwargs)


def _updates(results, server_round: int) -> tuple[list[Update], list[Refusal]]:
    """The round's FitRes as Updates; a client whose parameters do not decode is refused."""
    updates, refused = [], []
    for proxy, res in results:
        try:
            updates.append(Update(proxy.cid, decode(res.parameters), int(res.num_examples)))
        except Exception as err:  # noqa: BLE001 - anything a client sends that numpy cannot read
            refused.append(Refusal(proxy.cid, "Malformed", f"parameters do not decode: {str(err)[:200]}",
                                   server_round))
    return updates, refused


def _train_loss(results, accepted: list[Update]) -> float | None:
    """The accepted clients' reported training loss, weighted by their (capped) sample counts."""
    loss = {c.cid: r.metrics.get("trainLoss") for c, r in results}
    pairs = [(float(loss[u.client]), u.samples) for u in accepted
             if isinstance(loss.get(u.client), (int, float)) and np.isfinite(loss[u.client])]
    return _weighted(pairs)


def _refused_text(refused: list[Refusal]) -> str:
    if not refused:
        return ""
    return f", {len(refused)} refused ({'; '.join(f'{r.client}: {r.reason}' for r in refused)})"


def _weighted(pairs: list[tuple[float, int]]) -> float | None:
    total = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / total if total else None


def start_grpc(address: str, client_manager, tls: Tls, admission: Admission | None = None
               ) -> tuple[grpc.Server, int]:
    """A gRPC server with Flower's FlowerService that accepts only clients with a certificate of the CA, each
    identity once (`admission`)."""
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=64),
                         options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                  ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
    add_FlowerServiceServicer_to_server(IdentityServicer(client_manager, admission or Admission()), server)
    creds = grpc.ssl_server_credentials([(tls.key, tls.cert)], root_certificates=tls.ca, require_client_auth=True)
    port = server.add_secure_port(address, creds)
    server.start()
    return server, port


@dataclass
class ServerRun:
    """A running Flower server: `port` is bound; `wait()` returns the final head or raises RoundFailed."""

    grpc_server: grpc.Server
    port: int
    thread: threading.Thread
    outcome: dict
    admission: Admission

    def wait(self, timeout: float | None = None) -> Head:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise RoundFailed(f"the rounds did not finish within {timeout} s")
        if "error" in self.outcome:
            raise self.outcome["error"]
        return self.outcome["head"]


def serve(address: str, tls: Tls, strategy, *, rounds: int, round_timeout: float, wait_seconds: float,
          expected_clients: int = 0, on_refusal: Callable[[Refusal], None] = lambda r: None) -> ServerRun:
    """Start the server and run `rounds` rounds in a thread; at most `expected_clients` identities join (when
    set), and each refused connection goes to `on_refusal`."""
    manager = BoundedClientManager(wait_seconds, expected_clients)
    admission = Admission(expected_clients, on_refusal)
    grpc_server, port = start_grpc(address, manager, tls, admission)
    server = Server(client_manager=manager, strategy=strategy)
    outcome: dict = {}

    def run() -> None:
        try:
            server.fit(num_rounds=rounds, timeout=round_timeout)
            outcome["head"] = Head.of(decode(server.parameters))
        except Exception as err:  # noqa: BLE001 - reported to the caller by wait()
            outcome["error"] = err if isinstance(err, RoundFailed) else RoundFailed(f"{type(err).__name__}: {err}")
        finally:
            try:
                server.disconnect_all_clients(timeout=10)
            finally:
                grpc_server.stop(grace=2)

    thread = threading.Thread(target=run, name="flower-server", daemon=True)
    thread.start()
    return ServerRun(grpc_server, port, thread, outcome, admission)


def parameter_bytes(head: Head) -> int:
    """Bytes of the head's parameters as Flower serializes them (numpy .npy per tensor)."""
    return sum(len(t) for t in ndarrays_to_parameters(head.parameters()).tensors)


__all__ = ["Admission", "FitRes", "HeadClient", "Limits", "Parameters", "Refusal", "RoundFailed", "RoundResult",
           "ServerRun", "Tls", "Traffic", "make_strategy", "parameter_bytes", "run_client", "serve"]
