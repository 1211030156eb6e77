"""Operator settings: one typed object, read once from EDGEFLEET_* environment variables at start-up."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from . import __version__ as IMAGE_VERSION


def _cache() -> Path:
    return Path(os.environ.get("EDGEFLEET_CACHE", Path.home() / ".cache" / "edgefleet")).expanduser()


def _default_store() -> str:
    return str(_cache() / "artifacts")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_", extra="ignore")

    namespace: str = "edgefleet-system"
    """Namespace the operator runs in (its Secrets and compile Jobs live there)."""
    artifact_store: str = Field(default_factory=_default_store)
    """Where compiled variants go: `oci://host[:port]/repository` or a local directory."""
    artifact_insecure: bool = False
    """Talk plain HTTP to the OCI registry (loopback and lab registries)."""
    artifact_username: str | None = None
    artifact_password: str | None = None
    """Static credentials for the store; without them the operator logs in with the projected ServiceAccount
    token at $EDGEFLEET_REGISTRY_TOKEN_FILE when the chart mounts one (``store_login``)."""
    registry_token_audience: str = "edgefleet-registry"
    """Audience of the projected ServiceAccount token that compile, bench and federated pods push with (the store's
    token service, `edgefleet registry-token-server --service`); empty: those pods push anonymously."""
    job_service_account: str = "edgefleet-jobs"
    """ServiceAccount (in `namespace`, made by the operator when absent) of compile and bench Jobs: the identity
    the store's token service lets push to the operator's repository."""
    tenant_repository: str = "edgefleet/tenants"
    """Under the store's registry, `<tenant_repository>/<namespace>` is where a namespace's own pods push
    (FederatedTraining results); the token service gives a namespace's tokens nothing else."""
    results_key_secret: str = "edgefleet-results-key"
    """Secret (in `namespace`, key `key`, made by the operator when absent) whose key authenticates the reports of
    compile and bench Jobs; only the operator reads it."""
    source_max_bytes: int = Field(default=2 << 30, ge=1)
    """Largest source model (EdgeModel spec.source.uri) the operator reads; a larger one fails the compile
    (reason SourceLimitExceeded)."""
    source_deadline_seconds: float = Field(default=600.0, gt=0)
    """Seconds a source read may take in all (every request, redirect and byte); past it the compile fails
    (reason SourceLimitExceeded), however slowly the host keeps sending."""
    compile_executor: Literal["inline", "job"] = "inline"
    """`inline` compiles in the operator process; `job` runs `edgefleet compile` in a Kubernetes Job."""
    compiler_image: str = "ghcr.io/edgefleet/compiler:0.1.0"
    trainer_image: str = ""
    """Image of FederatedTraining's server and client pods (`edgefleet images build` makes `trainer`: the runtime
    plus the `federated` extra). Empty: `<image_registry>/trainer`, pinned by image_digests["trainer"] when set,
    else tagged with the version (how the chart passes the other images)."""
    trainer_artifact_store: str = ""
    """The artifact store as FederatedTraining's pods reach it, when that differs from artifact_store (a dev
    cluster whose operator runs on the host); empty: artifact_store."""
    image_registry: str = "ghcr.io/edgefleet"
    """Registry prefix of edgefleet's images: the built-in HardwareProfiles' runtime images are taken from it."""
    image_digests: dict[str, str] = Field(default_factory=dict)
    """Image name -> sha256 digest (JSON in EDGEFLEET_IMAGE_DIGESTS): built-in profiles pin their runtime by it."""
    compile_resources: dict = Field(default_factory=lambda: {"requests": {"cpu": "1", "memory": "2Gi"},
                                                             "limits": {"memory": "4Gi"}})
    """Resources of each compile Job's container (JSON in EDGEFLEET_COMPILE_RESOURCES, as the chart sets it)."""
    compiler_train_image: str = ""
    """Image of the compile Jobs whose EdgeModel asks for optimization.pruning or .distillation: the compiler plus
    the `train` extra (PyTorch, CPU use). Empty: those Jobs run compiler_image, which has no PyTorch, so their
    pruned and student candidates fail with reason MissingExtra naming this setting (EDGEFLEET_COMPILER_TRAIN_IMAGE)
    while the other candidates compile as usual."""
    train_resources: dict = Field(default_factory=lambda: {"requests": {"cpu": "2", "memory": "4Gi"},
                                                           "limits": {"memory": "8Gi"}})
    """Resources of a compile Job that trains (JSON in EDGEFLEET_TRAIN_RESOURCES); the others get compile_resources.
    Its deadline is compile_deadline_seconds plus each training's deadlineSeconds."""
    compile_node_selector: dict[str, str] = Field(default_factory=dict)
    """nodeSelector of the compile Jobs' pods (JSON in EDGEFLEET_COMPILE_NODE_SELECTOR): where compiles run."""
    compile_tolerations: list[dict] = Field(default_factory=list)
    """Tolerations of the compile Jobs' pods (JSON list of core/v1 Toleration in EDGEFLEET_COMPILE_TOLERATIONS)."""
    compile_deadline_seconds: int = 3600
    compile_jobs_per_namespace: int = Field(default=2, ge=1)
    """Compile Jobs that may run at once for the models of one namespace (EDGEFLEET_COMPILE_JOBS_PER_NAMESPACE): a
    namespace applying many models waits for its own slots and never holds the compile nodes from the others."""
    """activeDeadlineSeconds of a compile Job: past it the Job fails and its variants are Failed."""
    compile_cache: Path = Field(default_factory=lambda: _cache() / "compile")
    compile_host_latency_ms: dict[str, float] = Field(default_factory=dict)
    """Test hook (JSON in EDGEFLEET_COMPILE_HOST_LATENCY_MS, inline executor): candidate name -> the p50 at
    1 thread in ms the compile host reports instead of its measurement, e.g. {"openvino-fp32": 0.001} makes
    the host choose openvino-fp32; on-target selection then shows whether the node agrees."""
    bench_deadline_seconds: int = Field(default=600, ge=30)
    """activeDeadlineSeconds of a benchmark Job (a pod that cannot start counts too): past it the class keeps
    the host's choice and the EdgeModel says so (OnTargetSelected False, BenchJobFailed)."""
    bench_runs: int = Field(default=100, ge=5)
    """Timed runs per candidate and thread setting in a benchmark Job."""
    compile_timing_runs: int = 30
    """Timed inference runs per candidate when the compiler measures latency."""
    signing_key_file: Path | None = None
    """ECDSA P-256 private key (PEM, a mounted Secret) the compiler signs every published variant with
    (EDGEFLEET_SIGNING_KEY_FILE); unset: variants are published unsigned."""
    signing_key_secret: str | None = None
    """Secret in the operator's namespace, key `key`, that compile Jobs mount to sign with; unset: Jobs do not sign."""
    node_cache: str = "/var/lib/edgefleet/cache"
    """hostPath on every edge node where variants are cached by digest (without node_cache_driver)."""
    node_cache_driver: bool = False
    """Give runtime pods the node cache through its CSI driver (cache.edgefleet.io, chart value
    nodeCache.enabled) instead of the node_cache hostPath: each namespace gets its own folder, and pods of
    unprivileged classes pass Pod Security `restricted` (docs/security.md, "Runtime pods"). Off by default until
    the driver has run under a real kubelet."""
    watch_namespaces: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Namespaces to watch (comma-separated in the environment); empty means all."""
    resync_seconds: float = 60.0
    """How often every object is reconciled even when nothing changed."""
    settle_seconds: float = 0.5
    """How long a burst of changes is collected before one reconcile runs."""
    child_settle_seconds: float = 5.0
    """How long status changes of the workloads we made (pods becoming Ready) are collected before their
    EdgeDeployment is reconciled again; a deleted workload is replaced at once."""
    builtin_profiles: bool = False
    """Apply the built-in HardwareProfiles at start-up (the chart turns this on)."""
    metrics_port: int = 0
    """Port of the operator's Prometheus /metrics endpoint (the chart sets 9090); 0 turns it off."""
    field_manager: str = "edgefleet"
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _trainer_from_registry(self) -> Settings:
        if not self.trainer_image:
            repo = f"{self.image_registry.rstrip('/')}/trainer"
            digest = self.image_digests.get("trainer")
            self.trainer_image = f"{repo}@{digest}" if digest else f"{repo}:{IMAGE_VERSION}"
        return self

    @field_validator("watch_namespaces", mode="before")
    @classmethod
    def _split(cls, value):
        return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value


def store_login(settings: Settings) -> tuple[str | None, str | None]:
    """(username, password) for the operator's own store: the static credentials when set, else the operator
    pod's projected ServiceAccount token (edgefleet_runtime.fetch.pusher_login), else anonymous (None, None)."""
    if settings.artifact_username:
        return settings.artifact_username, settings.artifact_password
    from edgefleet_runtime.fetch import pusher_login

    return pusher_login() or (None, None)

