"""FederatedTraining end to end on the dev cluster's real node: the operator (in this process, watching only
this module's namespace) starts the Flower server Job and three client Jobs on node `vm` from the `trainer`
image; each client reads its own non-IID shard of the digits training split from a hostPath directory this
module writes (and removes); the server reports every round to the artifact store and publishes the result,
digest-pinned, which the operator writes into the target EdgeModel's source.

Checked: the aggregated model (fetched by its digest and scored here) beats the starting model and every
client's local-only model on held-out data; every update a client sent was the head's parameters plus at most
512 bytes (the server's per-client byte counts), far less than one shard; a client pod deleted mid-run leaves
the rounds to the other two (minClients 2), or with minClients 3 fails the run clearly with nothing published.
Traffic goes only to the pods and registry of the dev cluster. Timings are printed (`pytest -s`)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from federated_helpers import EVAL, eval_data, fresh_head_model, noniid_shards, shard_npz
from kube_helpers import apply, get, items, wait_for
from real_node_helpers import TOLERATION, real_node_class, tolerating_real_node

pytestmark = pytest.mark.cluster

ROUNDS, EPOCHS = 3, 5
STORE_REPO = "edgefleet-fl"


def say(line: str) -> None:
    """To the real stdout: KopfRunner swaps sys.stdout while the operator runs (seen with `pytest -s`)."""
    print(line, file=sys.__stdout__, flush=True)


def note(key: str, value: float) -> None:
    say(f"[federated timing] {key}: {value:.1f} s")


@pytest.fixture(scope="module")
def fl(edgefleet_api, real_node):
    """The module's namespace, the shards on the node's disk, and the operator watching that namespace with the
    trainer image pinned as the chart pins it (images.registry + images.digests)."""
    from edgefleet_dev.admin import local_data_allowed
    from edgefleet_dev.net import free_port
    from kopf.testing import KopfRunner

    cluster = edgefleet_api
    ns = f"rn-fl-{uuid.uuid4().hex[:8]}"  # rn-*: the session operator fixture leaves it alone
    cluster.kubectl("create", "namespace", ns)
    data = Path(tempfile.mkdtemp(prefix="edgefleet-fl-"))
    data.chmod(0o755)  # the client pods run as uid 10001 and mount it read-only
    shards = noniid_shards()
    for i, (x, y) in enumerate(shards):
        path = data / f"data-{i}.npz"
        path.write_bytes(shard_npz(x, y))
        path.chmod(0o644)
    # one address of the registry for the operator (on this host) and the pods: the node's bridge IP
    store = f"oci://{cluster.pod_registry}/{STORE_REPO}"
    env = {"KUBECONFIG": str(cluster.kubeconfig), "EDGEFLEET_ARTIFACT_STORE": store,
           "EDGEFLEET_NAMESPACE": ns,  # the operator's own namespace (its report key) must exist, as in an install
           "EDGEFLEET_ARTIFACT_INSECURE": "true", "EDGEFLEET_BUILTIN_PROFILES": "false",
           "EDGEFLEET_WATCH_NAMESPACES": ns, "EDGEFLEET_IMAGE_REGISTRY": "ghcr.io/edgefleet",
           "EDGEFLEET_IMAGE_DIGESTS": json.dumps(real_node), "EDGEFLEET_COMPILE_TIMING_RUNS": "5",
           "EDGEFLEET_METRICS_PORT": str(free_port())}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    inputs = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "fl-inputs"},
              "binaryData": {"start.onnx": base64.b64encode(fresh_head_model()).decode(),
                             "eval.npz": base64.b64encode(EVAL.read_bytes()).decode()}}
    apply(cluster, ns, inputs)
    # as the cluster admin: the real node's class lets this namespace read the shards' folder and tolerate the
    # node's taint (spec.localDataPaths, spec.tolerations), else the run fails HostPathNotAllowed
    profile = real_node_class(cluster)
    try:
        with tolerating_real_node(cluster, profile), local_data_allowed(cluster, profile, str(data), ns), \
                KopfRunner(["run", "--standalone", "--namespace", ns, "-m", "edgefleet.handlers"],
                           timeout=60) as runner:
            yield {"cluster": cluster, "ns": ns, "data": data, "shards": shards, "store": store, "runner": runner}
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        shutil.rmtree(data, ignore_errors=True)


def edge_model(name: str) -> dict:
    """The starting model (trained body, untrained head). Its targetProfiles name no existing class, so the
    operator compiles nothing here (this module checks the training and the publish, not the compile that a
    new source starts)."""
    return {"apiVersion": "edgefleet.io/v1alpha1", "kind": "EdgeModel", "metadata": {"name": name},
            "spec": {"source": {"configMap": {"name": "fl-inputs", "key": "start.onnx"}}, "format": "onnx",
                     "targetProfiles": {"names": ["federated-e2e-no-class"]}}}


def training(fl, name: str, target: str, **over) -> dict:
    node = fl["cluster"].real_node["name"]
    spec = {"sourceModel": {"name": target}, "targetModel": {"name": target},
            "participants": {"nodeSelector": {"matchLabels": {"kubernetes.io/hostname": node}},
                             "clientsPerNode": 3, "tolerations": [TOLERATION]},
            "localData": {"hostPath": str(fl["data"])}, "rounds": ROUNDS, "minClients": 2,
            "training": {"epochs": EPOCHS},
            "evaluation": {"data": {"configMap": {"name": "fl-inputs", "key": "eval.npz"}}, "minAccuracy": 0.5},
            "roundTimeoutSeconds": 60}
    spec.update(over)
    return {"apiVersion": "edgefleet.io/v1alpha1", "kind": "FederatedTraining", "metadata": {"name": name},
            "spec": spec}


def start(fl, name: str, target: str, **over) -> None:
    apply(fl["cluster"], fl["ns"], [edge_model(target), training(fl, name, target, **over)])


def status(fl, name: str) -> dict:
    return get(fl["cluster"], fl["ns"], "federatedtraining", name).get("status") or {}


def terminal(fl, name: str, marks: dict[str, float] | None = None) -> dict | None:
    """The status once Succeeded or Failed; `marks` gets the monotonic time each phase was first seen."""
    s = status(fl, name)
    if marks is not None:
        pods = items(fl["cluster"], fl["ns"], "pods", "-l", f"edgefleet.io/federated-training={name}")
        running = len(pods) == 4 and all(p["status"].get("phase") == "Running" for p in pods)  # server + 3
        phases = {"server and 3 clients running": running or s.get("roundsDone"),
                  "first round in status": s.get("roundsDone")}
        marks.update({k: time.monotonic() for k, v in phases.items() if v and k not in marks})
    done = [c for c in s.get("conditions", []) if c["type"] in ("Succeeded", "Failed") and c["status"] == "True"]
    return s if done else None


def condition(s: dict, type_: str) -> dict | None:
    return next((c for c in s.get("conditions", []) if c["type"] == type_ and c["status"] == "True"), None)


def report(fl, name: str) -> dict | None:
    """The server's report as it pushed it, read out of its sealed envelope without checking the seal (the
    operator checks it and copies part of it into status)."""
    from edgefleet.artifacts import StoreError, open_store

    uid = get(fl["cluster"], fl["ns"], "federatedtraining", name)["metadata"]["uid"][:8]
    # the run's pods push to the namespace's tenant repository (render.federated.tenant_store)
    registry = fl["store"][len("oci://"):].split("/", 1)[0]
    ref = f"oci://{registry}/edgefleet/tenants/{fl['ns']}:fl-{name}-{uid}-report"
    try:
        envelope = json.loads(open_store(ref, True).get(ref, ""))  # sealed by the server (edgefleet_runtime.sealed)
        return json.loads(envelope["report"])
    except (StoreError, ValueError, KeyError):
        return None


def fetch(fl, ref: str, digest: str) -> bytes:
    """The published model, by its digest."""
    from edgefleet.artifacts import open_store

    return open_store(ref, True).get(ref, digest)


def accuracy(model: bytes, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    return float((logits.argmax(1) == y).mean())


def failure_detail(fl, name: str) -> str:
    ns = fl["ns"]
    pods = items(fl["cluster"], ns, "pods", "-l", f"edgefleet.io/federated-training={name}")
    states = {p["metadata"]["name"]: (p["status"].get("phase"), [c.get("state") for c in
                                                                 p["status"].get("containerStatuses", [])])
              for p in pods}
    server = fl["cluster"].kubectl("logs", "-n", ns, f"job/fl-{name}", "--tail=15", check=False)
    rep = report(fl, name) or {}
    return (f"status {json.dumps(status(fl, name))[:2000]}\npods {json.dumps(states)[:3000]}\nreport state "
            f"{rep.get('state')} rounds {len(rep.get('rounds', []))} {rep.get('message', '')}\nserver log tail\n"
            f"{(server.stdout or '')[-3000:]}{(server.stderr or '')[-500:]}")


def test_federated_on_the_real_node_beats_local_only_and_start_sending_only_parameters(fl):
    from edgefleet_runtime.federated.flower import parameter_bytes
    from edgefleet_runtime.federated.trainer import HeadModel, loss_and_accuracy, train

    cluster, ns = fl["cluster"], fl["ns"]
    started = time.monotonic()
    start(fl, "ft", "digits-fl")
    marks: dict[str, float] = {}
    final = wait_for(lambda: terminal(fl, "ft", marks), 240, 1,
                     lambda: f"the run to finish\n{failure_detail(fl, 'ft')}")
    for phase, at in sorted(marks.items(), key=lambda m: m[1]):
        note(f"apply -> {phase}", at - started)
    note("apply -> Succeeded (pods scheduled, pulled, 3 rounds, published)", time.monotonic() - started)
    assert condition(final, "Succeeded"), failure_detail(fl, "ft")
    assert final["roundsDone"] == ROUNDS and [r["clients"] for r in final["rounds"]] == [3] * ROUNDS

    # the target EdgeModel now points at the published model, digest-pinned
    em = get(cluster, ns, "edgemodel", "digits-fl")
    assert em["spec"]["source"] == {"uri": final["publishedRef"], "digest": final["publishedDigest"]}
    published = fetch(fl, final["publishedRef"], final["publishedDigest"])

    # held-out accuracy: the published model against the start and each client trained alone as long
    ex, ey = eval_data()
    start_model = HeadModel(fresh_head_model())
    start_acc = accuracy(fresh_head_model(), ex, ey)
    fed_acc = accuracy(published, ex, ey)
    eval_features = start_model.features({"input": ex})
    local = [loss_and_accuracy(train(start_model.head, start_model.features({"input": x}), y,
                                     epochs=EPOCHS * ROUNDS, seed=i), eval_features, ey)[1]
             for i, (x, y) in enumerate(fl["shards"])]
    say(f"[federated] start {start_acc:.3f} federated {fed_acc:.3f} local-only {[round(a, 3) for a in local]}")
    assert fed_acc == pytest.approx(final["finalAccuracy"], abs=1e-6)
    assert fed_acc > start_acc and fed_acc > max(local)

    # only parameters crossed the network: each client's update per round is the head's size + framing
    rep = report(fl, "ft")
    params = parameter_bytes(start_model.head)
    shard_bytes = min(x.nbytes for x, _ in fl["shards"])
    sizes = [n for r in rep["rounds"] for n in r["bytesPerClient"]]
    say(f"[federated] parameters {params} B, per-client updates {sorted(set(sizes))} B, smallest shard "
          f"{shard_bytes} B")
    assert len(sizes) == 3 * ROUNDS and all(params <= n <= params + 512 for n in sizes), (sizes, params)
    assert rep["parameterBytes"] == params
    # the run's Secret: made by the operator, owned by the run (the garbage collector deletes it with it)
    secret = get(cluster, ns, "secret", "fl-ft-run")
    assert secret["metadata"]["ownerReferences"][0]["kind"] == "FederatedTraining"


@pytest.mark.parametrize("min_clients", [2, 3])
def test_federated_client_deleted_mid_run_goes_on_with_the_rest_or_fails_publishing_nothing(fl, min_clients):
    cluster, ns = fl["cluster"], fl["ns"]
    name, target = f"ft-drop-{min_clients}", f"digits-drop-{min_clients}"
    rounds = 30  # long enough to delete a client while it runs; each round is a fraction of a second
    started = time.monotonic()
    # roundTimeoutSeconds also bounds the wait for clients to connect: with minClients 3 the round after the
    # deletion fails after it (the image is on the node by now: pods start in seconds)
    start(fl, name, target, rounds=rounds, minClients=min_clients, training={"epochs": 2}, roundTimeoutSeconds=20)
    wait_for(lambda: (report(fl, name) or {}).get("rounds"), 240, 0.3,
             lambda: f"the first round\n{failure_detail(fl, name)}")
    victim = f"fl-{name}-c-{fl['cluster'].real_node['name']}-2"
    cluster.kubectl("delete", "pod", "-n", ns, "-l", f"job-name={victim}", "--grace-period=1", "--wait=false")
    deleted_after = len(report(fl, name)["rounds"])
    final = wait_for(lambda: terminal(fl, name), 240, 1, lambda: f"the run to finish\n{failure_detail(fl, name)}")
    note(f"run with a client deleted (minClients {min_clients})", time.monotonic() - started)
    assert deleted_after < rounds, "the run ended before a client could be deleted; make rounds longer"
    em = get(cluster, ns, "edgemodel", target)
    rounds_seen = final.get("rounds", [])
    say(f"[federated] minClients {min_clients}: client deleted after round {deleted_after}; clients per round "
        f"{[r['clients'] for r in rounds_seen]}; {final['conditions'][-1]['message'][:160]}")
    if min_clients == 2:
        assert condition(final, "Succeeded"), failure_detail(fl, name)
        assert final["roundsDone"] == rounds
        # after the deletion every round aggregated the other two, never fewer than the minimum
        assert all(r["clients"] >= 2 for r in rounds_seen)
        assert [r["clients"] for r in rounds_seen][-1] == 2 and any(r["clients"] == 3 for r in rounds_seen)
        assert em["spec"]["source"]["digest"] == final["publishedDigest"]
    else:
        failed = condition(final, "Failed")
        assert failed and failed["reason"] == "RoundFailed", failure_detail(fl, name)
        # mid-round: "round N: 2 clients returned an update, 1 failed; the minimum is 3"; between rounds:
        # "only 2 of the minimum 3 clients connected within 20 s"
        assert re.search(r"\bminimum (is )?3\b", failed["message"]), failed["message"]
        assert "publishedDigest" not in final and "publishedRef" not in final
        # the failed run's rounds stay in status; every one that completed had all 3 clients
        assert len(rounds_seen) >= deleted_after and all(r["clients"] == 3 for r in rounds_seen), rounds_seen
        assert em["spec"]["source"] == {"configMap": {"name": "fl-inputs", "key": "start.onnx"}}
        events = items(cluster, ns, "events", "--field-selector", f"involvedObject.name={name}")
        assert any(e["type"] == "Warning" and e["reason"] == "RoundFailed" for e in events)
