"""FederatedTraining (edgefleet.io/v1alpha1): fine-tune an EdgeModel's classifier head on the fleet's own data
with Flower, and publish the result as a new source of an EdgeModel when it beats the start."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field

from .base import API_VERSION, Conditions, Digest, LabelSelector, Model, Name, Rule, checked, list_map
from .models import HOST_PATH_RULE, NOT_ROOT, DataRef, ObjectBase, Toleration

LOCAL_DATA_NOT_ROOT = Rule(
    f"!self.matches(r'{NOT_ROOT}')",
    "localData.hostPath must not be '/' (the whole node): name the directory that holds the training data,"
    " one the HardwareProfiles allow in spec.localDataPaths",
    lambda v: re.fullmatch(NOT_ROOT, v) is None,
)

SUCCEEDED = "Succeeded"
FAILED = "Failed"
CLIENTS_REFUSED = "ClientsRefused"  # True once the server refused a client's update or connection


class ModelName(Model):
    """An EdgeModel in the FederatedTraining's namespace."""

    name: Name
    """The EdgeModel's name."""


CONTROL_PLANE_TAINTS = ("node-role.kubernetes.io/control-plane", "node-role.kubernetes.io/master")
NO_CONTROL_PLANE_RULE = Rule(
    "self.all(t, has(t.key) && t.key != '' && !(t.key in " + str(list(CONTROL_PLANE_TAINTS)) + "))",
    "participants.tolerations: training pods may not tolerate the control plane's taints "
    f"({', '.join(CONTROL_PLANE_TAINTS)}) nor every taint (a toleration without key); tolerate only your edge"
    " nodes' taints, e.g. node-role.kubernetes.io/edge",
    lambda ts: all(t.key and t.key not in CONTROL_PLANE_TAINTS for t in ts),
)


class Participants(Model):
    """Which nodes train: those matching nodeSelector and/or belonging to one of hardwareClasses."""

    node_selector: LabelSelector | None = None
    """Nodes whose labels match (metav1.LabelSelector)."""
    hardware_classes: Annotated[
        list[Name], Field(max_length=32, json_schema_extra={"x-kubernetes-list-type": "set"})
    ] | None = None
    """HardwareProfile names: nodes of these classes take part."""
    clients_per_node: Annotated[int, Field(ge=1, le=16)] = 1
    """Client pods per node, each with its own shard index 0..clientsPerNode-1 (several data owners on one node,
    or a small cluster)."""
    tolerations: Annotated[list[Toleration], Field(max_length=32), *checked(NO_CONTROL_PLANE_RULE)] = Field(
        default_factory=list)
    """Tolerations of the client (and server) pods, e.g. for tainted edge nodes: each must be one that the
    HardwareProfile of every participating node lists (spec.tolerations), and none may tolerate the
    control plane's taints or every taint."""

    cel_rules = (
        Rule("has(self.nodeSelector) || (has(self.hardwareClasses) && size(self.hardwareClasses) > 0)",
             "participants: set nodeSelector and/or hardwareClasses to say which nodes train",
             lambda s: s.node_selector is not None or bool(s.hardware_classes)),
    )


class LocalData(Model):
    """Where each client finds its data on its node: an .npz keyed by the model's input names plus `y`."""

    host_path: Annotated[str, Field(min_length=1, max_length=4096, pattern=r"^/[^\x00]*$"), *checked(HOST_PATH_RULE),
                         *checked(LOCAL_DATA_NOT_ROOT)]
    """A directory on the node, mounted read-only into the client pods. It must be, or lie below, a
    directory that the HardwareProfile of every participating node allows for this namespace
    (spec.localDataPaths); '/' never is."""
    file_name: Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9{}]+$")] = "data-{index}.npz"
    """The file in hostPath each client reads; `{index}` becomes its shard index."""


class Aggregation(Model):
    """How the server screens and combines the clients' updates. Every update is screened first: one with NaN or
    Inf, the wrong shape or no samples is refused, and so is one whose norm is above maxUpdateNorm; the sample
    count a client reports is capped at maxSamplesPerClient. Refused clients are named in status.refusedClients."""

    strategy: Literal["FedAvg", "FedProx", "TrimmedMean", "Median"] = "FedAvg"
    """FedAvg (mean weighted by the capped sample counts), FedProx (FedAvg with a proximal term on the clients),
    TrimmedMean (per parameter, the mean after dropping the trimFraction largest and smallest values) or Median
    (per parameter). TrimmedMean and Median ignore the sample counts and resist a minority of outliers."""
    proximal_mu: Annotated[float, Field(ge=0, le=100)] | None = None
    """FedProx's mu: how strongly local training is pulled towards the round's global model."""
    trim_fraction: Annotated[float, Field(gt=0, lt=0.5)] | None = None
    """TrimmedMean's share of values dropped at each end, rounded up, at least one value kept (default 0.2: with
    3 to 5 clients, one at each end)."""
    max_update_norm: Annotated[float, Field(gt=0, le=1e12)] | None = None
    """Largest L2 norm of an update (a client's parameters minus the round's model); larger updates are refused.
    Unset: 3 x the median norm of the round's updates, which needs at least 3 clients to single out one."""
    max_samples_per_client: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = None
    """Cap on the sample count a client reports (FedAvg's weight). Unset: 2 x the round's median count."""

    cel_rules = (
        Rule("!has(self.proximalMu) || self.strategy == 'FedProx'",
             "aggregation.proximalMu applies to strategy FedProx only; remove it or set strategy: FedProx",
             lambda s: s.proximal_mu is None or s.strategy == "FedProx", ".proximalMu"),
        Rule("!has(self.trimFraction) || self.strategy == 'TrimmedMean'",
             "aggregation.trimFraction applies to strategy TrimmedMean only; remove it or set strategy: TrimmedMean",
             lambda s: s.trim_fraction is None or s.strategy == "TrimmedMean", ".trimFraction"),
    )


class Training(Model):
    """What trains and how, on each client, each round."""

    layers: Literal["classifierHead"] = "classifierHead"
    """classifierHead: the final dense layer (Gemm, or MatMul + Add) that produces the model's logits; the rest
    of the graph is frozen. Models without one are refused (status Failed, reason UnsupportedModel)."""
    epochs: Annotated[int, Field(ge=1, le=100)] = 5
    """Local epochs per round."""
    learning_rate: Annotated[float, Field(gt=0, lt=1)] = 0.5
    """SGD step relative to the features' scale (values in (0, 1) are stable)."""
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 32
    """Mini-batch size."""


class Evaluation(Model):
    """Held-out data the server scores every round on, and the gate the result must pass."""

    data: DataRef
    """An .npz keyed by the model's input names plus `y` (labels)."""
    min_accuracy: Annotated[float, Field(ge=0, le=1)] | None = None
    """Top-1 accuracy (0..1) the fine-tuned model must reach; it must also beat the starting model."""


class FederatedTrainingSpec(Model):
    """A federated fine-tuning run: where to start, who trains on what, how long, and where the result goes."""

    source_model: ModelName
    """The EdgeModel whose source model training starts from."""
    target_model: ModelName
    """The EdgeModel whose source is set to the fine-tuned model (may be the source model itself)."""
    participants: Participants
    """Which nodes train, and how many clients each."""
    local_data: LocalData
    """Where each client's data is on its node; it never leaves the client pod."""
    rounds: Annotated[int, Field(ge=1, le=1000)] = 3
    """Federated rounds."""
    min_clients: Annotated[int, Field(ge=1, le=1000)] = 2
    """Clients that must return an update in every round; a round with fewer fails the run."""
    aggregation: Aggregation = Field(default_factory=Aggregation)
    """How updates are screened (maxUpdateNorm, maxSamplesPerClient) and combined (FedAvg, FedProx, TrimmedMean,
    Median)."""
    training: Training = Field(default_factory=Training)
    """Which layers train and the local optimiser's settings."""
    evaluation: Evaluation
    """Held-out data and the accuracy gate."""
    round_timeout_seconds: Annotated[int, Field(ge=10, le=86400)] = 600
    """How long the server waits for a client's update in a round."""


class RoundStatus(Model):
    """One finished round."""

    round: Annotated[int, Field(ge=1)]
    """The round number (1-based)."""
    clients: Annotated[int, Field(ge=0)]
    """Clients whose update was aggregated."""
    failures: Annotated[int, Field(ge=0)] = 0
    """Clients that were asked and did not answer."""
    refused: Annotated[int, Field(ge=0)] = 0
    """Clients whose update was refused (named in refusedClients)."""
    loss: float | None = None
    """Cross-entropy of the aggregated model on the evaluation data."""
    accuracy: Annotated[float, Field(ge=0, le=1)] | None = None
    """Top-1 accuracy of the aggregated model on the evaluation data."""


class RefusedClient(Model):
    """A client the server refused: its update (NaN or Inf, too large, malformed) or its connection (an identity
    that had already joined, or one more than the run admitted)."""

    client: Annotated[str, Field(min_length=1, max_length=253)]
    """The client's name as its certificate gives it (its Job's name), or the peer address without one."""
    reason: Annotated[str, Field(min_length=1, max_length=64)]
    """NonFinite, UpdateTooLarge, Malformed, NoSamples, DuplicateIdentity, TooManyClients or NoIdentity."""
    message: Annotated[str, Field(max_length=1024)] = ""
    """What the server saw (e.g. the update's norm and the bound)."""
    round: Annotated[int, Field(ge=1)] | None = None
    """The last round in which its update was refused (absent for a refused connection)."""
    count: Annotated[int, Field(ge=1)] = 1
    """How many times it was refused."""


class FederatedTrainingStatus(Model):
    """Progress of the run."""

    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The .metadata.generation this status describes."""
    conditions: Conditions = Field(default_factory=list)
    """Progressing, Succeeded, Failed, and ClientsRefused (True when the server refused a client; see
    refusedClients)."""
    clients: Annotated[int, Field(ge=0)] | None = None
    """Client pods the run started."""
    rounds_done: Annotated[int, Field(ge=0)] = 0
    """Rounds finished."""
    rounds: Annotated[list[RoundStatus], Field(max_length=1000, json_schema_extra=list_map("round"))] = Field(
        default_factory=list)
    """Per round: clients, loss and accuracy."""
    refused_clients: Annotated[list[RefusedClient], Field(max_length=1000,
                                                          json_schema_extra=list_map("client"))] = Field(
        default_factory=list)
    """Clients the server refused, each with the reason (the latest one)."""
    start_accuracy: Annotated[float, Field(ge=0, le=1)] | None = None
    """Accuracy of the starting model on the evaluation data."""
    final_accuracy: Annotated[float, Field(ge=0, le=1)] | None = None
    """Accuracy of the fine-tuned model."""
    published_ref: Annotated[str, Field(max_length=2048)] | None = None
    """oci:// reference (digest-pinned) of the published model."""
    published_digest: Digest | None = None
    """sha256 of the published model file."""


class FederatedTraining(ObjectBase):
    """Federated fine-tuning of an EdgeModel's classifier head across the fleet (Flower, mutual TLS); the raw data
    stays on the nodes and only parameters cross the network."""

    api_version: Literal["edgefleet.io/v1alpha1"] = API_VERSION
    kind: Literal["FederatedTraining"] = "FederatedTraining"
    spec: FederatedTrainingSpec
    status: FederatedTrainingStatus | None = None
