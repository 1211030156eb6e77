"""Federated training's trust boundary: one compromised client cannot steer the model or join twice.

Unit tests of the screening and the aggregation rules (robust.py), then Flower rounds in process (real gRPC with
mutual TLS on loopback) with a client that scales its update, one that sends NaN, and one that replays another
client's certificate."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from edgefleet.federated_cli import _refused
from edgefleet.federated_tls import make_bundle
from edgefleet_runtime.federated import flower, robust
from edgefleet_runtime.federated.robust import Limits, Update
from edgefleet_runtime.federated.trainer import HeadModel, loss_and_accuracy
from federated_helpers import client_names, eval_data, fresh_head_model, noniid_shards, run_in_process, tls_of

FIT = {"epochs": 5, "learningRate": 0.5, "batchSize": 32}


# ----------------------------------------------------------------------------- screening and aggregation
def _honest(n: int = 5, seed: int = 0) -> tuple[list[np.ndarray], list[Update]]:
    """A round's model and n honest updates near it (norms about 1, similar sample counts)."""
    rng = np.random.default_rng(seed)
    start = [rng.standard_normal((6, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32)]
    updates = [Update(f"h{i}", [p + 0.2 * rng.standard_normal(p.shape).astype(np.float32) for p in start],
                      int(rng.integers(90, 110))) for i in range(n)]
    return start, updates


def _in_honest_range(agg: list[np.ndarray], honest: list[Update]) -> bool:
    for i, a in enumerate(agg):
        stack = np.stack([u.params[i] for u in honest])
        if not (np.all(a >= stack.min(axis=0) - 1e-6) and np.all(a <= stack.max(axis=0) + 1e-6)):
            return False
    return True


def test_federated_boundary_scaled_and_nan_updates_are_refused_named_and_the_aggregate_stays_honest():
    start, honest = _honest()
    delta = [p - s for p, s in zip(honest[0].params, start, strict=True)]
    scaled = Update("evil-scaled", [s + 20 * d for s, d in zip(start, delta, strict=True)], 100)  # a boosted update
    nan = Update("evil-nan", [np.full_like(start[0], np.nan), start[1]], 100)
    inf = Update("evil-inf", [start[0], np.full_like(start[1], np.inf)], 100)
    screened = robust.screen(honest + [scaled, nan, inf], start, Limits(), round_=2)
    refused = {r.client: r for r in screened.refused}
    assert {c: r.reason for c, r in refused.items()} == {"evil-scaled": "UpdateTooLarge", "evil-nan": "NonFinite",
                                                         "evil-inf": "NonFinite"}
    assert "above the bound" in refused["evil-scaled"].message and "3 x the round's median" in \
        refused["evil-scaled"].message
    assert all(r.round == 2 for r in screened.refused)
    assert [u.client for u in screened.accepted] == [u.client for u in honest]
    for strategy in robust.STRATEGIES:
        assert _in_honest_range(robust.aggregate(strategy, screened.accepted), honest), strategy
    # without the screening, FedAvg would leave the honest range: the check above can fail
    assert not _in_honest_range(robust.fedavg([(u.params, u.samples) for u in honest + [scaled]]), honest)


def test_federated_boundary_max_update_norm_is_an_absolute_bound_when_set():
    start, honest = _honest(3)
    norms = sorted(robust.update_norm(u.params, start) for u in honest)
    bound = (norms[0] + norms[1]) / 2  # between the smallest and the next
    screened = robust.screen(honest, start, Limits(max_update_norm=bound))
    assert len(screened.accepted) == 1 and len(screened.refused) == 2
    assert all(r.reason == "UpdateTooLarge" and "(maxUpdateNorm)" in r.message for r in screened.refused)


def test_federated_boundary_reported_sample_counts_are_capped():
    start, honest = _honest(4)
    liar = Update("liar", [p + 0.1 for p in start], 10**9)  # a small update, an enormous claimed weight
    screened = robust.screen(honest + [liar], start, Limits())
    cap = int(np.ceil(2 * np.median([u.samples for u in honest + [liar]])))
    assert screened.clipped == ["liar"] and screened.accepted[-1].samples == cap
    weights = [u.samples for u in screened.accepted]
    assert weights[-1] / sum(weights) < 0.35  # without the cap: 0.9999996
    capped = robust.screen(honest + [liar], start, Limits(max_samples=50))
    assert all(u.samples <= 50 for u in capped.accepted) and "liar" in capped.clipped


@pytest.mark.parametrize(("params", "samples", "reason"), [
    ([np.zeros((6, 2), np.float32), np.zeros(3, np.float32)], 10, "Malformed"),
    ([np.zeros((6, 3), np.float32)], 10, "Malformed"),
    ([np.array([["a"] * 3] * 6), np.zeros(3, np.float32)], 10, "Malformed"),
    ([np.zeros((6, 3), np.float32), np.zeros(3, np.float32)], 0, "NoSamples"),
])
def test_federated_boundary_malformed_updates_are_refused(params, samples, reason):
    start, honest = _honest(3)
    screened = robust.screen(honest + [Update("odd", params, samples)], start, Limits())
    assert [(r.client, r.reason) for r in screened.refused] == [("odd", reason)]


def test_federated_boundary_trimmed_mean_and_median_resist_one_outlier():
    start, honest = _honest(5)
    outlier = Update("outlier", [p + 1000.0 for p in start], 100)  # let through: the bound is set very high
    screened = robust.screen(honest + [outlier], start, Limits(max_update_norm=1e9))
    assert not screened.refused
    assert not _in_honest_range(robust.aggregate("FedAvg", screened.accepted), honest)  # FedAvg is dragged away
    for strategy in ("TrimmedMean", "Median"):
        assert _in_honest_range(robust.aggregate(strategy, screened.accepted), honest), strategy
    # per coordinate: the median of 6 values is the mean of the 3rd and 4th; one outlier moves it by one rank
    agg = robust.aggregate("Median", screened.accepted)
    assert np.allclose(agg[1], np.median(np.stack([u.params[1] for u in screened.accepted]), axis=0))


@pytest.mark.parametrize(("n", "fraction", "dropped"), [(3, 0.2, 1), (5, 0.2, 1), (6, 0.2, 2), (10, 0.2, 2),
                                                        (2, 0.2, 0), (4, 0.49, 1)])
def test_federated_boundary_trim_count_drops_at_least_one_and_keeps_one(n, fraction, dropped):
    assert robust.trim_count(n, fraction) == dropped


def test_federated_boundary_unknown_strategy_names_the_choices():
    _, honest = _honest(3)
    with pytest.raises(ValueError, match="use one of FedAvg, FedProx, TrimmedMean, Median"):
        robust.aggregate("Krum", honest)


# ----------------------------------------------------------------------------- Flower in process
@pytest.fixture(scope="module")
def model():
    return HeadModel(fresh_head_model())


@pytest.fixture(scope="module")
def data(model):
    shards = [(model.features({"input": x}), y) for x, y in noniid_shards()]
    ex, ey = eval_data()
    return shards, (model.features({"input": ex}), ey)


class Scaled(flower.HeadClient):
    """Trains honestly, then sends start + factor x its update (model replacement / boosting)."""

    def __init__(self, *a, factor: float, **kw):
        super().__init__(*a, **kw)
        self.factor = factor

    def fit(self, parameters, config):
        params, n, metrics = super().fit(parameters, config)
        return [s + self.factor * (p - s) for p, s in zip(params, parameters, strict=True)], n, metrics


class NaNs(flower.HeadClient):
    def fit(self, parameters, config):
        params, n, metrics = super().fit(parameters, config)
        return [np.full_like(params[0], np.nan), params[1]], n, metrics


def _strategy(model, data, results, **kw):
    _, (ex, ey) = data
    return flower.make_strategy(kw.pop("aggregation", "FedAvg"), min_clients=3, initial=model.head, eval_x=ex,
                                eval_y=ey, fit_config=FIT, on_round=results.append, **kw)


def test_federated_boundary_flower_refuses_scaled_and_nan_clients_names_them_and_keeps_the_honest_model(model, data):
    shards, (ex, ey) = data
    honest = [flower.HeadClient(x, y, seed=i) for i, (x, y) in enumerate(shards)]
    attackers = [Scaled(*shards[0], seed=9, factor=30.0), NaNs(*shards[1], seed=8)]  # c3 and c4
    results: list[flower.RoundResult] = []
    head, _, errors, _ = run_in_process(model, data, _strategy(model, data, results), honest + attackers, rounds=2)
    assert not errors
    assert [r.clients for r in results] == [3, 3]
    for r in results:
        assert {(x.client, x.reason) for x in r.refused} == {("c3", "UpdateTooLarge"), ("c4", "NonFinite")}
    # the refused clients changed nothing: the same rounds with the honest clients alone give the same model
    alone: list[flower.RoundResult] = []
    honest_head, *_ = run_in_process(model, data, _strategy(model, data, alone),
                                     [flower.HeadClient(x, y, seed=i) for i, (x, y) in enumerate(shards)], rounds=2)
    assert np.allclose(head.w, honest_head.w, atol=1e-6) and np.allclose(head.b, honest_head.b, atol=1e-6)
    start_acc, acc = loss_and_accuracy(model.head, ex, ey)[1], loss_and_accuracy(head, ex, ey)[1]
    print(f"start {start_acc:.3f}, with a scaled and a NaN client refused {acc:.3f}")
    assert acc > start_acc + 0.5


def test_federated_boundary_flower_too_few_updates_left_fails_the_round_naming_the_refused(model, data):
    shards, _ = data
    clients = [flower.HeadClient(*shards[0], seed=0), flower.HeadClient(*shards[1], seed=1), NaNs(*shards[2])]
    with pytest.raises(flower.RoundFailed, match=r"round 1: 2 clients returned an update, 1 refused \(c2: NonFinite\)"
                                                 r", 0 failed; the minimum is 3") as err:
        run_in_process(model, data, _strategy(model, data, []), clients, rounds=1)
    assert [(r.client, r.reason) for r in err.value.refused] == [("c2", "NonFinite")]


class Gated(flower.HeadClient):
    """Holds its first update until `go` is set, so the test can knock while the round is open."""

    def __init__(self, *a, go: threading.Event, **kw):
        super().__init__(*a, **kw)
        self.go = go

    def fit(self, parameters, config):
        self.go.wait(30)
        return super().fit(parameters, config)


def test_federated_boundary_replayed_identity_and_one_client_too_many_are_refused_and_named(model, data):
    shards, (ex, ey) = data
    bundle = make_bundle("t", ["localhost"], client_names(4))  # c3: a valid certificate the run did not count on
    refusals: list[robust.Refusal] = []
    results: list[flower.RoundResult] = []
    run = flower.serve("127.0.0.1:0", tls_of(bundle, "server"), _strategy(model, data, results), rounds=1,
                       round_timeout=60, wait_seconds=30, expected_clients=3, on_refusal=refusals.append)
    go = threading.Event()
    honest = [threading.Thread(target=flower.run_client, daemon=True,
                               args=(f"127.0.0.1:{run.port}", Gated(x, y, seed=i, go=go), tls_of(bundle, f"c{i}")),
                               kwargs={"server_name": "localhost"}) for i, (x, y) in enumerate(shards)]
    for t in honest:
        t.start()
    try:
        for _ in range(300):
            if len(run.admission.joined) == 3:
                break
            threading.Event().wait(0.1)
        assert sorted(run.admission.joined) == ["c0", "c1", "c2"]
        for tls, name, reason in [(tls_of(bundle, "c0"), "c0", "DuplicateIdentity"),  # c0's key, copied
                                  (tls_of(bundle, "c3"), "c3", "TooManyClients")]:
            with pytest.raises(grpc.RpcError) as err:
                flower.run_client(f"127.0.0.1:{run.port}", flower.HeadClient(*shards[0]), tls, server_name="localhost")
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert f"{name}: {reason}" in err.value.details()
            assert _refused(err.value)  # the client command stops instead of retrying
    finally:
        go.set()
    head = run.wait(timeout=120)
    for t in honest:
        t.join(30)
    assert [(r.client, r.reason) for r in refusals] == [("c0", "DuplicateIdentity"), ("c3", "TooManyClients")]
    assert "from ipv4:127.0.0.1" in refusals[0].message
    assert [r.clients for r in results] == [3]  # the round went on with the three admitted clients
    assert loss_and_accuracy(head, ex, ey)[1] > loss_and_accuracy(model.head, ex, ey)[1]


def test_federated_boundary_client_certificates_name_the_client_and_node_and_never_the_server():
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    clients = {"fl-ft-c-vm-0": "vm", "fl-ft-c-vm-1": "vm", "fl-ft-c-pi-0": "pi"}
    bundle = make_bundle("fl-ft", ["fl-ft.team.svc"], clients)
    ca = x509.load_pem_x509_certificate(bundle.ca_cert)
    keys = {bundle.server.key} | {p.key for p in bundle.clients.values()}
    assert len(keys) == 4  # every side its own key
    for name, pair in bundle.clients.items():
        cert = x509.load_pem_x509_certificate(pair.cert)
        cert.verify_directly_issued_by(ca)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
        dns = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)
        assert dns == [name.split("-c-")[1].rsplit("-", 1)[0]]  # the node
        assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
            ExtendedKeyUsageOID.CLIENT_AUTH]  # cannot serve as the server
        data = bundle.client_secret_data(name)
        assert set(data) == {"ca.crt", "client.crt", "client.key"} and bundle.server.key not in data.values()
    assert set(bundle.server_secret_data()) == {"ca.crt", "server.crt", "server.key"}
    assert not {p.key for p in bundle.clients.values()} & set(bundle.server_secret_data().values())

