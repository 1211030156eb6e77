"""Kopf handlers: thin. Watch events mark objects dirty; the controller's workers reconcile them."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, cast

import kopf

from ..api import builtin_profiles
from ..kube import GROUP, VERSION, ApiError, Kube
from ..reconcile import reconcile_deployment, reconcile_model, reconcile_profile
from ..reconcile.federated import reconcile_federated_by_name
from ..render.bench_job import WATCH_LABELS as BENCH_WATCH_LABELS
from ..render.compile_job import MODEL_NAME, MODEL_NAMESPACE, WATCH_LABELS
from ..render.federated import NAME as FEDERATED_NAME
from ..render.workload import MANAGED_BY
from ..settings import Settings
from . import metrics
from .cache import Cache, CachedKube
from .controller import Controller
from .nodes import NodeWatch

log = logging.getLogger("edgefleet.handlers")
MANAGED = {"app.kubernetes.io/managed-by": MANAGED_BY}

Handler = Callable[..., Awaitable[None]]


def on_event(*args: Any, **kwargs: Any) -> Callable[[Handler], Handler]:
    """kopf.on.event for handlers that name only the keywords they use, typed as the namespaced kinds they watch
    (kopf's protocol asks for every keyword, namespace as str | None)."""
    return cast(Callable[[Handler], Handler], kopf.on.event(*args, **kwargs))


@kopf.on.login()
def login(**kwargs):
    """In a pod: the service account; elsewhere: $KUBECONFIG (read now, not at import time)."""
    info = kopf.login_with_service_account(**kwargs)
    if info is not None and (server := in_cluster_server(os.environ)):
        info = dataclasses.replace(info, server=server)
    return info or kopf.login_with_kubeconfig(**kwargs)


def in_cluster_server(env) -> str | None:
    """The API server as the kubelet tells every pod (KUBERNETES_SERVICE_HOST/PORT), as client-go's in-cluster
    config finds it: Kopf's own default, https://kubernetes.default.svc, needs cluster DNS."""
    host = env.get("KUBERNETES_SERVICE_HOST")
    if not host:
        return None
    host = f"[{host}]" if ":" in host else host
    return f"https://{host}:{env.get('KUBERNETES_SERVICE_PORT') or '443'}"


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    config = Settings()
    logging.getLogger("edgefleet").setLevel(config.log_level.upper())
    # only on.event handlers: Kopf keeps no progress, diff-base or finalizer on our objects
    settings.posting.enabled = False  # we post our own events, on transitions only
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 120
    kube = Kube.connect(config.field_manager)
    metrics.serve(config.metrics_port)
    if config.builtin_profiles:
        await asyncio.to_thread(apply_builtin_profiles, kube, config.image_registry, config.image_digests)
    ctl = Controller(kube, config)
    # know the fleet before the first reconcile: an empty cache would look like a fleet without nodes
    (nodes, version), profiles = await asyncio.to_thread(
        lambda: (kube.list_labels_at("Node"), kube.list("HardwareProfile")))
    memo.cache = Cache()  # reconcilers read their objects and children from the watches, not the API
    await asyncio.to_thread(memo.cache.prime, kube, MANAGED)
    kube = CachedKube(kube, memo.cache)  # from here on: reads from the cache, writes to the API
    ctl.nodes = nodes
    ctl.profiles = {p["metadata"]["name"]: p for p in profiles}
    ctl.add_queue("EdgeModel", lambda ns, name, world: reconcile_model(kube, config, ns, name, world), 2)
    ctl.add_queue("EdgeDeployment", lambda ns, name, world: reconcile_deployment(kube, config, ns, name, world), 8)
    ctl.add_queue("HardwareProfile", lambda _, name, world: reconcile_profile(kube, name, world), 2)
    ctl.add_queue("FederatedTraining", lambda ns, name, _: reconcile_federated_by_name(kube, config, ns, name), 2)
    memo.controller = ctl
    memo.node_watch = NodeWatch(kube, asyncio.get_running_loop(), functools.partial(_node_changed, ctl))
    memo.node_watch.start(nodes, version)
    memo.stopped = asyncio.Event()
    memo.tasks = [asyncio.create_task(ctl.run(q, memo.stopped)) for q in ctl.queues.values()]
    memo.tasks.append(asyncio.create_task(ctl.resync(memo.stopped)))
    for task in memo.tasks:
        task.add_done_callback(_report_crash)


def _report_crash(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("a controller task stopped: %r; the operator must be restarted", task.exception(),
                  exc_info=task.exception())


def apply_builtin_profiles(kube: Kube, registry: str, digests: dict[str, str]) -> None:
    """Create or update the built-in HardwareProfiles; fields a user changed stay the user's."""
    for profile in builtin_profiles(registry, digests):
        name = profile.metadata["name"]
        try:
            kube.apply(profile.to_dict(), force=False)
        except ApiError as err:
            if err.status == 404:
                log.warning("the HardwareProfile CRD is not installed: built-in profiles not applied")
                return
            if err.status != 409:
                log.warning("could not apply the built-in HardwareProfile %s: %s", name, err)
                continue
            log.info("HardwareProfile %s was changed by someone else; left as it is (%s)", name, err)


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_) -> None:
    memo.stopped.set()
    memo.node_watch.stop()
    for task in memo.tasks:
        task.cancel()


def _track(queue, key, event_type: str, generation: int | None) -> bool:
    """Remember or forget an object; True when it needs a reconcile: new, or its spec changed. Our own
    status writes do not bump the generation, so they do not queue the object again."""
    if event_type == "DELETED":
        queue.forget(key)
        return False
    queue.known.add(key)
    if queue.generations.get(key) == generation and event_type is not None:
        return False
    queue.generations[key] = generation
    return True


def _remember(memo: kopf.Memo, kind: str, event_type: str | None, body) -> None:
    """Keep the watch cache the reconcilers read from up to date."""
    meta = body.get("metadata", {})
    if event_type == "DELETED":
        memo.cache.drop(kind, meta.get("namespace"), meta["name"])
    else:
        memo.cache.put(kind, dict(body))


@on_event(GROUP, VERSION, "edgemodels")
async def model_event(type: str, name: str, namespace: str, meta, body, memo: kopf.Memo, **_) -> None:
    ctl: Controller = memo.controller
    _remember(memo, "EdgeModel", type, body)
    if _track(ctl.queues["EdgeModel"], (namespace, name), type, meta.get("generation")):
        ctl.queues["EdgeModel"].mark((namespace, name))
    for key, model in ctl.model_of.items():
        if key[0] == namespace and model == name:
            ctl.queues["EdgeDeployment"].mark(key)


@on_event(GROUP, VERSION, "edgedeployments")
async def deployment_event(type: str, name: str, namespace: str, spec, meta, body, memo: kopf.Memo, **_) -> None:
    ctl: Controller = memo.controller
    _remember(memo, "EdgeDeployment", type, body)
    key = (namespace, name)
    if type == "DELETED":
        ctl.model_of.pop(key, None)
    else:
        ctl.model_of[key] = spec.get("modelRef", {}).get("name", "")
    if _track(ctl.queues["EdgeDeployment"], key, type, meta.get("generation")):
        ctl.queues["EdgeDeployment"].mark(key)


@on_event(GROUP, VERSION, "hardwareprofiles")
async def profile_event(type: str, name: str, body, memo: kopf.Memo, **_) -> None:
    ctl: Controller = memo.controller
    _remember(memo, "HardwareProfile", type, body)
    _track(ctl.queues["HardwareProfile"], ("", name), type, None)
    if type == "DELETED":
        ctl.profiles.pop(name, None)
    else:
        obj = dict(body)
        old = ctl.profiles.get(name, {})
        if _placement_fields(old) == _placement_fields(obj) and type is not None:
            return  # a status write: nothing that places workloads changed
        ctl.profiles[name] = obj
    ctl.fleet_changed()


def _placement_fields(profile: dict) -> tuple:
    return profile.get("spec"), dict(profile.get("metadata", {}).get("labels") or {})


def _node_changed(ctl: Controller, name: str, labels: dict[str, str] | None) -> None:
    """From the node watch: a node's labels changed, it joined (labels) or it left (None)."""
    if labels is None:
        ctl.nodes.pop(name, None)
    else:
        ctl.nodes[name] = labels
    ctl.fleet_changed()


def _child_event(event_type: str | None, namespace: str, labels, memo: kopf.Memo) -> None:
    """Reconcile the owner: at once when its child is gone, else once the child's status settles (a rollout
    changes a DaemonSet's status with every pod; one look per child_settle_seconds is enough)."""
    owner = labels.get("edgefleet.io/deployment")
    if not owner:
        return
    queue = memo.controller.queues["EdgeDeployment"]
    if event_type == "DELETED":
        queue.mark((namespace, owner))
    else:
        queue.mark_later((namespace, owner), memo.controller.settings.child_settle_seconds)


@on_event("apps", "v1", "daemonsets", labels=MANAGED)
async def daemonset_event(type: str, namespace: str, labels, body, memo: kopf.Memo, **_) -> None:
    _remember(memo, "DaemonSet", type, body)
    _child_event(type, namespace, labels, memo)


@on_event("apps", "v1", "deployments", labels=MANAGED)
async def workload_event(type: str, namespace: str, labels, body, memo: kopf.Memo, **_) -> None:
    _remember(memo, "Deployment", type, body)
    _child_event(type, namespace, labels, memo)


@on_event("", "v1", "services", labels=MANAGED)
async def service_event(type: str, namespace: str, labels, body, memo: kopf.Memo, **_) -> None:
    _remember(memo, "Service", type, body)
    _child_event(type, namespace, labels, memo)


@on_event("batch", "v1", "jobs", labels=WATCH_LABELS)
async def compile_job_event(annotations, memo: kopf.Memo, **_) -> None:
    """A compile Job (executor job) changed: its EdgeModel reads the outcome."""
    _model_job_event(annotations, memo)


@on_event("batch", "v1", "jobs", labels=BENCH_WATCH_LABELS)
async def bench_job_event(annotations, memo: kopf.Memo, **_) -> None:
    """A benchmark Job changed: its EdgeModel reads the on-target numbers."""
    _model_job_event(annotations, memo)


def _model_job_event(annotations, memo: kopf.Memo) -> None:
    if annotations.get(MODEL_NAMESPACE) and annotations.get(MODEL_NAME):
        memo.controller.queues["EdgeModel"].mark((annotations[MODEL_NAMESPACE], annotations[MODEL_NAME]))


@on_event(GROUP, VERSION, "federatedtrainings")
async def federated_event(type: str, name: str, namespace: str, meta, body, memo: kopf.Memo, **_) -> None:
    ctl: Controller = memo.controller
    _remember(memo, "FederatedTraining", type, body)
    if _track(ctl.queues["FederatedTraining"], (namespace, name), type, meta.get("generation")):
        ctl.queues["FederatedTraining"].mark((namespace, name))


@on_event("batch", "v1", "jobs", labels={**MANAGED, "app.kubernetes.io/name": FEDERATED_NAME})
async def federated_job_event(namespace: str, meta, memo: kopf.Memo, **_) -> None:
    """A run's server or client Job changed (finished, failed, deleted): its FederatedTraining looks again."""
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == "FederatedTraining":
            memo.controller.queues["FederatedTraining"].mark((namespace, ref["name"]))
