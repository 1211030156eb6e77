"""The federated trainer: numpy head gradients over the frozen ONNX body, the aggregation math, and Flower
rounds in process (server and clients in threads, real gRPC with mutual TLS on loopback)."""

from __future__ import annotations

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from edgefleet.federated_tls import make_bundle
from edgefleet_runtime.federated import flower
from edgefleet_runtime.federated.robust import fedavg
from edgefleet_runtime.federated.trainer import (
    Head,
    HeadModel,
    UnsupportedModel,
    gradients,
    loss_and_accuracy,
    train,
)
from federated_helpers import (
    DIGITS,
    MODELS,
    client_names,
    eval_data,
    fresh_head_model,
    noniid_shards,
    run_in_process,
    tls_of,
)
from flwr.server.strategy.aggregate import aggregate
from onnx import TensorProto, helper

FIT = {"epochs": 5, "learningRate": 0.5, "batchSize": 32}


@pytest.fixture(scope="module")
def model():
    return HeadModel(fresh_head_model())


@pytest.fixture(scope="module")
def data(model):
    """Features of each non-IID shard and of the held-out set (the body runs once per module)."""
    shards = [(model.features({"input": x}), y) for x, y in noniid_shards()]
    ex, ey = eval_data()
    return shards, (model.features({"input": ex}), ey)


def test_federated_gradients_match_finite_differences():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 5)).astype(np.float64)
    y = rng.integers(0, 3, 7)
    head = Head(rng.standard_normal((5, 3)), rng.standard_normal(3))
    gw, gb = gradients(head, x, y)
    eps = 1e-6
    for i, j in [(0, 0), (2, 1), (4, 2)]:
        up, down = Head(head.w.copy(), head.b), Head(head.w.copy(), head.b)
        up.w[i, j] += eps
        down.w[i, j] -= eps
        numeric = (loss_and_accuracy(up, x, y)[0] - loss_and_accuracy(down, x, y)[0]) / (2 * eps)
        assert gw[i, j] == pytest.approx(numeric, rel=1e-4, abs=1e-7)
    up, down = Head(head.w, head.b.copy()), Head(head.w, head.b.copy())
    up.b[1] += eps
    down.b[1] -= eps
    assert gb[1] == pytest.approx((loss_and_accuracy(up, x, y)[0] - loss_and_accuracy(down, x, y)[0]) / (2 * eps),
                                  rel=1e-4)


def test_federated_head_split_reproduces_the_full_model(model):
    x, _ = eval_data()
    full = ort.InferenceSession(DIGITS.read_bytes(), providers=["CPUExecutionProvider"])
    trained = HeadModel(DIGITS.read_bytes())
    want = full.run(None, {"input": x[:32]})[0]
    assert np.allclose(trained.head.logits(trained.features({"input": x[:32]})), want, atol=1e-4)
    # a new head goes back into the same graph: the full model then computes features @ w + b
    head = Head(np.random.default_rng(3).standard_normal(trained.head.w.shape).astype(np.float32),
                np.arange(10, dtype=np.float32))
    merged = ort.InferenceSession(trained.with_head(head), providers=["CPUExecutionProvider"])
    assert np.allclose(merged.run(None, {"input": x[:32]})[0], head.logits(trained.features({"input": x[:32]})),
                       atol=1e-3)


def _tiny(nodes, inits, out_shape=(None, 3)):
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))],
                              [onnx.numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


W, B = np.ones((4, 3), np.float32), np.zeros(3, np.float32)


def test_federated_trainer_accepts_matmul_add_heads():
    m = HeadModel(_tiny([helper.make_node("MatMul", ["x", "w"], ["z"]), helper.make_node("Add", ["z", "b"], ["y"])],
                        {"w": W, "b": B}))
    assert m.head.w.shape == (4, 3) and m.layout.features == "x"


@pytest.mark.parametrize(("nodes", "inits", "reason"), [
    ([helper.make_node("Gemm", ["x", "w", "b"], ["z"]), helper.make_node("Softmax", ["z"], ["y"])],
     {"w": W, "b": B}, "comes from a Softmax node"),
    ([helper.make_node("Gemm", ["x", "w", "b"], ["y"], alpha=2.0)], {"w": W, "b": B}, "alpha or beta"),
    ([helper.make_node("Gemm", ["x", "x2", "b"], ["y"])], {"x2": W, "b": B, }, None),
    ([helper.make_node("Relu", ["x"], ["y"])], {}, "trains only a final dense layer"),
])
def test_federated_trainer_refuses_other_shapes_naming_the_reason(nodes, inits, reason):
    if reason is None:  # the weight is a graph input, not a constant
        nodes = [helper.make_node("Gemm", ["x", "wi", "b"], ["y"])]
        graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4]),
                                               helper.make_tensor_value_info("wi", TensorProto.FLOAT, [4, 3])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
                                  [onnx.numpy_helper.from_array(B, "b")])
        blob, reason = helper.make_model(graph).SerializeToString(), "must both be initializers"
    else:
        blob = _tiny(nodes, inits)
    with pytest.raises(UnsupportedModel, match=reason):
        HeadModel(blob)


def test_federated_trainer_refuses_the_encoder_fixture():
    with pytest.raises(UnsupportedModel, match="final dense layer"):
        HeadModel((MODELS / "tiny_encoder.onnx").read_bytes())


def test_federated_fedavg_is_flowers_weighted_mean():
    rng = np.random.default_rng(1)
    updates = [([rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32)], n)
               for n in (10, 30, 60)]
    ours, theirs = fedavg(updates), aggregate(updates)
    for a, b in zip(ours, theirs, strict=True):
        assert np.allclose(a, b, atol=1e-6)
    assert np.allclose(ours[1], 0.1 * updates[0][0][1] + 0.3 * updates[1][0][1] + 0.6 * updates[2][0][1], atol=1e-6)


def test_federated_fedprox_term_keeps_the_update_near_the_start(model, data):
    (x, y), _ = data[0][0], None
    plain = train(model.head, x, y, epochs=3)
    prox = train(model.head, x, y, epochs=3, proximal_mu=0.1)
    dist = lambda h: float(np.linalg.norm(h.w - model.head.w))  # noqa: E731
    assert dist(prox) < 0.5 * dist(plain)


# ----------------------------------------------------------------------------- Flower in process
class Dies(flower.HeadClient):
    """A client that is gone in round `round` (its stream breaks, as when its pod is killed)."""

    def __init__(self, *a, round: int, **kw):
        super().__init__(*a, **kw)
        self.die_at, self.rounds = round, 0

    def fit(self, parameters, config):
        self.rounds += 1
        if self.rounds == self.die_at:
            raise ConnectionAbortedError("client killed mid-round")
        return super().fit(parameters, config)


def _run(model, data, *, rounds=3, min_clients=3, clients=None, wait_seconds=30.0, keep=False):
    shards, (ex, ey) = data
    results: list[flower.RoundResult] = []
    strategy = flower.make_strategy("FedAvg", min_clients=min_clients, initial=model.head, eval_x=ex, eval_y=ey,
                                    fit_config=FIT, on_round=results.append)
    clients = clients or [flower.HeadClient(x, y, seed=i) for i, (x, y) in enumerate(shards)]
    head, traffic, errors, _ = run_in_process(model, data, strategy, clients, rounds=rounds,
                                              wait_seconds=wait_seconds, keep=keep)
    return head, results, traffic, errors


def test_federated_rounds_beat_local_only_and_start_with_only_parameters_on_the_wire(model, data):
    shards, (ex, ey) = data
    head, results, traffic, errors = _run(model, data, keep=True)
    assert not errors
    start_acc = loss_and_accuracy(model.head, ex, ey)[1]
    fed_acc = loss_and_accuracy(head, ex, ey)[1]
    local_acc = [loss_and_accuracy(train(model.head, x, y, epochs=FIT["epochs"] * 3, seed=i), ex, ey)[1]
                 for i, (x, y) in enumerate(shards)]
    print(f"start {start_acc:.3f} federated {fed_acc:.3f} local-only {local_acc}")
    assert fed_acc > max(local_acc) and fed_acc > start_acc
    assert [r.round for r in results] == [1, 2, 3] and all(r.clients == 3 and r.failures == 0 for r in results)
    assert results[-1].accuracy == pytest.approx(fed_acc)
    # what each client sent: one FitRes per round, each the head's parameters plus a few bytes of framing
    # and metrics, never more; and no message carries any of the client's images
    params = flower.parameter_bytes(model.head)
    for (x, _), t in zip(shards, traffic, strict=True):
        fits = [n for kind, n in t.sent if kind == "fit_ins"]
        assert len(fits) == 3 and all(params <= n <= params + 512 for n in fits), (fits, params)
        assert sum(n for _, n in t.sent) < 3 * (params + 512) + 64
        wire = b"".join(t.messages)
        for sample in x[:: max(1, len(x) // 25)]:
            assert sample.tobytes() not in wire and sample.astype(np.float64).tobytes() not in wire
    for r in results:
        assert all(params <= n <= params + 512 for n in r.bytes_per_client)


def test_federated_client_dying_mid_round_completes_with_the_rest_when_the_minimum_allows(model, data):
    shards, (ex, ey) = data
    clients = [flower.HeadClient(*shards[0], seed=0), flower.HeadClient(*shards[1], seed=1),
               Dies(*shards[2], seed=2, round=2)]
    head, results, _, errors = _run(model, data, min_clients=2, clients=clients)
    assert [(r.round, r.clients) for r in results] == [(1, 3), (2, 2), (3, 2)]
    assert results[1].failures == 1
    assert len(errors) == 1 and "killed mid-round" in str(errors[0])
    assert loss_and_accuracy(head, ex, ey)[1] > loss_and_accuracy(model.head, ex, ey)[1]


def test_federated_client_dying_fails_the_run_clearly_when_below_the_minimum(model, data):
    shards, _ = data
    clients = [flower.HeadClient(*shards[0]), flower.HeadClient(*shards[1]), Dies(*shards[2], round=2)]
    with pytest.raises(flower.RoundFailed, match="round 2: 2 clients returned an update, 1 failed; the minimum is 3"):
        _run(model, data, min_clients=3, clients=clients)


def test_federated_server_refuses_a_client_without_a_certificate_of_the_run(model, data):
    shards, (ex, ey) = data
    bundle, other = make_bundle("t", ["localhost"], client_names(1)), make_bundle("other", ["localhost"],
                                                                                   client_names(1))
    strategy = flower.make_strategy("FedAvg", min_clients=1, initial=model.head, eval_x=ex, eval_y=ey, fit_config=FIT)
    run = flower.serve("127.0.0.1:0", tls_of(bundle, "server"), strategy, rounds=1, round_timeout=30,
                       wait_seconds=3)
    stranger = flower.Tls(bundle.ca_cert, other.clients["c0"].cert, other.clients["c0"].key)  # trusts the server
    with pytest.raises(grpc.FutureTimeoutError):
        _connect_once(run.port, stranger)
    with pytest.raises(flower.RoundFailed, match="only 0 of the minimum 1 clients connected"):
        run.wait(timeout=60)


def _connect_once(port, tls):
    creds = grpc.ssl_channel_credentials(root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert)
    options = [("grpc.ssl_target_name_override", "localhost")]
    with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=options) as ch:
        grpc.channel_ready_future(ch).result(timeout=2)
