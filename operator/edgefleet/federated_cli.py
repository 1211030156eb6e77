"""`edgefleet-federated server|client`: the two processes of a FederatedTraining run (trainer image).

server: starts from the source model's head, runs the Flower rounds over mutual TLS (each client's
  certificate names it; an identity joins once), screens and aggregates each round's updates, evaluates each
  round on the evaluation data, pushes a JSON report (rounds, clients, loss/accuracy, bytes per client, the
  refused clients and why) to the artifact store after every round, and, only when every round completed and
  the result beats the start and the accuracy gate, pushes the fine-tuned model (OCI, digest-pinned) and names
  it in the report. Exit 0 when published, 1 when the run failed (the report says why), 2 for bad input.
client: computes its local data's features with the frozen body, answers the server's rounds and prints one
  JSON line per message it sent (kind, bytes): the data itself never leaves the process.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2
MEDIA_TYPE = "application/vnd.onnx"
MAX_REPORTED_REFUSALS = 1000


def _tls(tls_dir: str, side: str):
    from edgefleet_runtime.federated.flower import Tls

    d = Path(tls_dir)
    return Tls((d / "ca.crt").read_bytes(), (d / f"{side}.crt").read_bytes(), (d / f"{side}.key").read_bytes())


def _inputs(model, path: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """An .npz keyed by the model's input names plus `y` (int labels)."""
    with np.load(path) as d:
        missing = [n for n in model.input_names if n not in d.files]
        if missing or "y" not in d.files:
            raise click.UsageError(f"{path}: needs arrays {model.input_names + ['y']} (has {d.files}); missing "
                                   f"{missing + ([] if 'y' in d.files else ['y'])}")
        return {n: d[n] for n in model.input_names}, d["y"].astype(np.int64)


def _load_model(path: str):
    from edgefleet_runtime.federated.trainer import HeadModel, UnsupportedModel

    try:
        return HeadModel(Path(path).read_bytes())
    except UnsupportedModel as err:
        click.echo(json.dumps({"state": "Failed", "reason": "UnsupportedModel", "message": str(err)}), err=True)
        sys.exit(EXIT_BAD_INPUT)


class Reporter:
    """The run's report, pushed to the artifact store after each change (and printed)."""

    def __init__(self, report_ref: str | None):
        self.ref = report_ref
        self.doc: dict[str, Any] = {"state": "Running", "rounds": [], "refusedClients": []}
        self._lock = threading.Lock()  # rounds (server thread) and refused connections (gRPC threads) both report

    def update(self, **fields) -> None:
        with self._lock:
            self.doc.update(fields)
            self._push()

    def refused(self, refusals: list) -> None:
        """Add refusals (robust.Refusal) to refusedClients, at most MAX_REPORTED_REFUSALS in all."""
        if not refusals:
            return
        with self._lock:
            room = MAX_REPORTED_REFUSALS - len(self.doc["refusedClients"])
            self.doc["refusedClients"] += [r.to_dict() for r in refusals[:max(room, 0)]]
            self._push()

    def _push(self) -> None:
        text = json.dumps(self.doc, sort_keys=True)
        click.echo(text)
        if self.ref:
            from .compiler.cli import push_report

            push_report(self.ref, text.encode())


def gate(accuracy: float, start_accuracy: float, min_accuracy: float, rounds: int) -> str | None:
    """Why the fine-tuned model must not be published (None: it may): it must beat the start and the gate."""
    if accuracy > start_accuracy and accuracy >= min_accuracy:
        return None
    return (f"accuracy {accuracy:.4f} after {rounds} rounds does not beat the start ({start_accuracy:.4f}) and the "
            f"gate ({min_accuracy:.4f}); nothing published")


def _refused(err: Exception) -> bool:
    """The server refused this client (its identity joined already, or the run is full): retrying cannot help."""
    import grpc

    return isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.PERMISSION_DENIED


@click.group()
def main() -> None:
    """Federated fine-tuning of a model's last dense layer (Flower, mutual TLS)."""


@main.command()
@click.option("--model", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--eval", "eval_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--tls-dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--port", default=9092, show_default=True)
@click.option("--rounds", default=3, show_default=True)
@click.option("--min-clients", default=2, show_default=True)
@click.option("--expected-clients", default=0, show_default=True)
@click.option("--aggregation", type=click.Choice(["FedAvg", "FedProx", "TrimmedMean", "Median"]), default="FedAvg",
              show_default=True)
@click.option("--proximal-mu", default=0.0, show_default=True)
@click.option("--trim-fraction", default=0.2, show_default=True, help="TrimmedMean: share dropped at each end")
@click.option("--max-update-norm", type=float, help="refuse updates with a larger L2 norm [3 x the round's median]")
@click.option("--max-samples-per-client", type=int, help="cap on a reported sample count [2 x the round's median]")
@click.option("--epochs", default=5, show_default=True)
@click.option("--learning-rate", default=0.5, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--round-timeout", default=300.0, show_default=True)
@click.option("--wait-seconds", default=300.0, show_default=True)
@click.option("--min-accuracy", default=0.0, show_default=True, help="the accuracy gate (0..1)")
@click.option("--store", help="artifact store for the fine-tuned model, oci://host/repo")
@click.option("--name", default="federated", show_default=True, help="artifact name (tag prefix)")
@click.option("--report", "report_ref", help="oci://host/repo:tag for the JSON report")
def server(model, eval_path, tls_dir, port, rounds, min_clients, expected_clients, aggregation, proximal_mu,
           trim_fraction, max_update_norm, max_samples_per_client, epochs, learning_rate, batch_size, round_timeout,
           wait_seconds, min_accuracy, store, name, report_ref):
    """Run the Flower server for `--rounds` rounds and publish the result when it beats the start."""
    from edgefleet_runtime.federated import flower
    from edgefleet_runtime.federated.trainer import loss_and_accuracy

    reporter = Reporter(report_ref)
    head_model = _load_model(model)
    inputs, y = _inputs(head_model, eval_path)
    ex = head_model.features(inputs)
    start_loss, start_acc = loss_and_accuracy(head_model.head, ex, y)
    reporter.update(startLoss=start_loss, startAccuracy=start_acc, minClients=min_clients,
                    parameterBytes=flower.parameter_bytes(head_model.head))

    def on_round(r: flower.RoundResult) -> None:
        reporter.update(rounds=reporter.doc["rounds"] + [{
            "round": r.round, "clients": r.clients, "failures": r.failures, "loss": r.loss, "accuracy": r.accuracy,
            "trainLoss": r.train_loss, "bytesPerClient": r.bytes_per_client,
            "refused": [x.client for x in r.refused], "samplesCapped": r.clipped}])
        reporter.refused(r.refused)

    limits = flower.Limits(max_update_norm, max_samples_per_client)
    strategy = flower.make_strategy(aggregation, min_clients=min_clients, initial=head_model.head, eval_x=ex,
                                    eval_y=y, proximal_mu=proximal_mu, limits=limits, trim_fraction=trim_fraction,
                                    on_round=on_round, fit_config={"epochs": epochs, "learningRate": learning_rate,
                                                                   "batchSize": batch_size})
    run = flower.serve(f"[::]:{port}", _tls(tls_dir, "server"), strategy, rounds=rounds,
                       round_timeout=round_timeout, wait_seconds=wait_seconds, expected_clients=expected_clients,
                       on_refusal=lambda refusal: reporter.refused([refusal]))
    try:
        head = run.wait()
    except flower.RoundFailed as err:
        reporter.refused(err.refused)
        reporter.update(state="Failed", reason="RoundFailed", message=str(err))
        sys.exit(EXIT_FAILED)
    _, acc = loss_and_accuracy(head, ex, y)
    refusal = gate(acc, start_acc, min_accuracy, rounds)  # before any publish
    if refusal:
        reporter.update(state="Failed", reason="AccuracyGate", finalAccuracy=acc, message=refusal)
        sys.exit(EXIT_FAILED)
    published = None
    if store:
        from .artifacts import pod_store

        ref = pod_store(store).put(head_model.with_head(head), name=name, media_type=MEDIA_TYPE,
                                    annotations={"io.edgefleet.federated.accuracy": f"{acc:.6f}"},
                                    filename="model.onnx")
        published = {"ref": ref.ref, "digest": ref.digest, "sizeBytes": ref.sizeBytes}
    reporter.update(state="Succeeded", reason="Published" if published else "Finished", finalAccuracy=acc,
                    published=published, message=f"accuracy {start_acc:.4f} -> {acc:.4f} in {rounds} rounds")


@main.command()
@click.option("--model", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--data", "data_path", required=True, help="local .npz (model input names + y); {index} is replaced")
@click.option("--index", default=0, show_default=True, help="this client's shard index on its node")
@click.option("--server", "address", required=True, help="host:port of the Flower server")
@click.option("--server-name", help="the name in the server's certificate when it differs from the host")
@click.option("--tls-dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--retry-seconds", default=300.0, show_default=True)
def client(model, data_path, index, address, server_name, tls_dir, retry_seconds):
    """Join the server and train on local data until the server ends the run."""
    from edgefleet_runtime.federated import flower

    head_model = _load_model(model)
    path = data_path.replace("{index}", str(index))
    if not Path(path).is_file():
        raise click.UsageError(f"--data: no file {path} (this client's shard {index}); put it on the node there")
    inputs, y = _inputs(head_model, path)
    x = head_model.features(inputs)
    click.echo(json.dumps({"event": "ready", "samples": len(y), "classes": sorted(set(y.tolist()))}))
    traffic = flower.Traffic()
    deadline = time.monotonic() + retry_seconds
    while True:
        try:
            flower.run_client(address, flower.HeadClient(x, y, seed=index), _tls(tls_dir, "client"), traffic,
                              server_name=server_name,
                              on_message=lambda kind: click.echo(json.dumps({"event": "sent", "kind": kind,
                                                                             "bytes": traffic.sent[-1][1]})))
            break
        except Exception as err:  # noqa: BLE001 - the server not up yet: retry until the deadline
            if traffic.sent or time.monotonic() > deadline or _refused(err):
                raise
            click.echo(json.dumps({"event": "retry", "error": str(err)[:200]}))
            time.sleep(3)
    click.echo(json.dumps({"event": "done", "messages": len(traffic.sent),
                           "bytesSent": sum(n for _, n in traffic.sent)}))
