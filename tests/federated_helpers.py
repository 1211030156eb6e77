"""Digits data for the federated tests: the training split of make_models.py (the same seed, so none of
digits_eval.npz's held-out images), cut into non-IID shards, and a starting model with a fresh head."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

MODELS = Path(__file__).parent / "fixtures" / "models"
DIGITS = MODELS / "digits_cnn.onnx"
EVAL = MODELS / "digits_eval.npz"
# each client sees 6 of the 10 classes; together they cover all of them
SHARD_CLASSES = [(0, 1, 2, 3, 4, 5), (4, 5, 6, 7, 8, 9), (0, 1, 2, 7, 8, 9)]


def digits_train() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    xtr, _, ytr, _ = train_test_split(x, d.target.astype(np.int64), test_size=450, random_state=0, stratify=d.target)
    return xtr, ytr


def noniid_shards(classes=SHARD_CLASSES) -> list[tuple[np.ndarray, np.ndarray]]:
    """One (images, labels) shard per entry of `classes`; a class two clients share is split between them."""
    x, y = digits_train()
    owners = {c: [i for i, cs in enumerate(classes) if c in cs] for c in range(10)}
    picks: list[list[int]] = [[] for _ in classes]
    for c, who in owners.items():
        idx = np.flatnonzero(y == c)
        for part, client in zip(np.array_split(idx, len(who)), who, strict=True):
            picks[client] += part.tolist()
    return [(x[np.sort(p)], y[np.sort(p)]) for p in picks]


def shard_npz(x: np.ndarray, y: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, input=x, y=y)
    return buf.getvalue()


def fresh_head_model(seed: int = 1) -> bytes:
    """The digits CNN with its last Gemm re-initialised (small random weights): the trained body, an untrained
    head, about chance accuracy: the model a fleet starts fine-tuning from."""
    m = onnx.load(DIGITS)
    rng = np.random.default_rng(seed)
    for t in m.graph.initializer:
        if t.name == "w4":
            t.CopyFrom(numpy_helper.from_array((rng.standard_normal((10, 2048)) * 1e-3).astype(np.float32), "w4"))
        elif t.name == "b4":
            t.CopyFrom(numpy_helper.from_array(np.zeros(10, np.float32), "b4"))
    return m.SerializeToString()


def eval_data() -> tuple[np.ndarray, np.ndarray]:
    d = np.load(EVAL)
    return d["input"], d["y"]


def client_names(n: int) -> dict[str, str]:
    """Client certificate names -> node, for `make_bundle`: c0, c1, ... on node `node`."""
    return {f"c{i}": "node" for i in range(n)}


def tls_of(bundle, side: str):
    """flower.Tls of the bundle's server (side "server") or of the named client."""
    from edgefleet_runtime.federated import flower

    pair = bundle.server if side == "server" else bundle.clients[side]
    return flower.Tls(bundle.ca_cert, pair.cert, pair.key)


def run_in_process(model, data, strategy, clients, *, rounds=3, wait_seconds=30.0, keep=False, tls=None,
                   expected_clients=None, on_refusal=None):
    """Flower rounds in threads over loopback mutual TLS: the server with `strategy`, one thread per client.
    `tls`: the client-side flower.Tls of each client (default: its own certificate c0, c1, ...). Returns
    (final head, traffic per client, errors the clients raised, the server's ServerRun)."""
    import threading

    from edgefleet.federated_tls import make_bundle
    from edgefleet_runtime.federated import flower

    bundle = make_bundle("t", ["localhost"], client_names(len(clients)))
    tls = tls or [tls_of(bundle, f"c{i}") for i in range(len(clients))]
    run = flower.serve("127.0.0.1:0", tls_of(bundle, "server"), strategy, rounds=rounds, round_timeout=60,
                       wait_seconds=wait_seconds,
                       expected_clients=len(clients) if expected_clients is None else expected_clients,
                       on_refusal=on_refusal or (lambda r: None))
    traffic = [flower.Traffic(keep_messages=keep) for _ in clients]
    errors: list[BaseException] = []

    def client_thread(c, t, client_tls):
        try:
            flower.run_client(f"127.0.0.1:{run.port}", c, client_tls, t, server_name="localhost")
        except BaseException as err:  # noqa: BLE001 - the test looks at them
            errors.append(err)

    threads = [threading.Thread(target=client_thread, args=args, daemon=True)
               for args in zip(clients, traffic, tls, strict=True)]
    for t in threads:
        t.start()
    try:
        head = run.wait(timeout=240)
    finally:
        for t in threads:
            t.join(30)
    return head, traffic, errors, run
