"""The edgefleet.io/v1alpha1 kinds: HardwareProfile, EdgeModel and EdgeDeployment.

These classes are the single source of truth: `edgefleet crds` turns them into the CRDs (field
docstrings become `kubectl explain` text, `cel_rules` become `x-kubernetes-validations`).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field

from .base import (
    ABSOLUTE_PATH,
    API_VERSION,
    DNS_1035_LABEL,
    DNS_SUBDOMAIN,
    LABEL_KEY,
    LABEL_KEY_HINT,
    LABEL_VALUE,
    LONG_PREFIX,
    SUBDOMAIN,
    AnyKey,
    Conditions,
    Digest,
    LabelSelector,
    Model,
    Name,
    Reason,
    Rule,
    ShortText,
    checked,
    is_label_key,
    list_map,
)
from .preprocessing import PipelineSpec, Postprocessing, Preprocessing

Format = Literal["onnx", "tflite", "openvino", "coreml"]
Precision = Literal["fp32", "fp16", "int8"]
Quantization = Literal["auto", "none", "fp16", "dynamic-int8", "static-int8"]
RUNTIME_CACHE_MOUNT = "/var/lib/edgefleet/cache"  # where the runtime container reads the node's variant cache

# an image reference as container runtimes parse it: [registry[:port]/]repository[:tag][@algorithm:hex]
_DOMAIN_PART = r"[a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?"
_PATH_PART = r"[a-z0-9]+(([.]|_|__|-+)[a-z0-9]+)*"
IMAGE_REFERENCE = (
    rf"^(({_DOMAIN_PART}([.]{_DOMAIN_PART})*|\[[a-fA-F0-9:]+\])(:[0-9]+)?/)?{_PATH_PART}(/{_PATH_PART})*"
    r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$"
)
IMAGE_RULE = Rule(
    f"self.matches(r'{IMAGE_REFERENCE}')",
    "runtimeImage must be an image reference, [registry[:port]/]repository[:tag][@sha256:digest] with a lowercase"
    " repository, e.g. ghcr.io/edgefleet/runtime-cpu:0.1.0",
    lambda v: re.fullmatch(IMAGE_REFERENCE, v) is not None,
)
Image = Annotated[str, Field(min_length=1, max_length=512), *checked(IMAGE_RULE)]
Path = Annotated[str, Field(min_length=1, max_length=4096, pattern=ABSOLUTE_PATH)]
BACKSTEP = r"(^|/)[.][.](/|$)"
HOST_PATH_RULE = Rule(
    f"!self.matches(r'{BACKSTEP}')",
    "hostPath must not contain '..' (Kubernetes refuses back-steps in host paths); write the path without them",
    lambda v: re.search(BACKSTEP, v) is None,
)
# one format per runtime: what its backend loads
RUNTIME_FORMAT = {"onnxruntime": "onnx", "litert": "tflite", "openvino": "openvino", "coreml": "coreml"}


class ObjectBase(Model):
    """Common top level of every kind."""

    api_version: str = API_VERSION
    """edgefleet.io/v1alpha1"""
    kind: str = ""
    """The kind of the object."""
    metadata: dict[str, Any] = Field(default_factory=dict)
    """Standard object metadata (name, namespace, labels, ...), kept as the API server returns it."""


# ======================= HardwareProfile =======================

class Target(Model):
    """What a model is compiled to for this hardware: file format, numeric precision and runtime."""

    format: Format
    """Model file format the runtime loads: onnx, tflite, openvino or coreml."""
    precision: Precision
    """Numeric precision of the compiled variant: fp32, fp16 or int8."""
    runtime: Literal["onnxruntime", "litert", "openvino", "coreml"]
    """Inference engine in the runtime image: onnxruntime, litert (TensorFlow Lite), openvino or coreml."""
    execution_provider: Literal["cpu", "cuda", "tensorrt", "openvino"] | None = None
    """ONNX Runtime execution provider (onnxruntime only): cpu, cuda, tensorrt or openvino."""
    delegate: Annotated[str, Field(min_length=1, max_length=253)] | None = None
    """LiteRT delegate library (litert only), e.g. libedgetpu.so.1 for a Coral Edge TPU."""

    cel_rules = (
        Rule(
            "self.format == " + "{" + ", ".join(f"'{r}': '{f}'" for r, f in RUNTIME_FORMAT.items()) + "}[self.runtime]",
            "target.runtime: each runtime loads one format: onnxruntime runs onnx, litert runs tflite, openvino runs"
            " openvino (IR), coreml runs coreml; make target.format and target.runtime agree (ONNX on Intel"
            " hardware: runtime onnxruntime with executionProvider openvino)",
            lambda s: RUNTIME_FORMAT[s.runtime] == s.format,
            ".runtime",
        ),
        Rule(
            "!has(self.delegate) || !self.delegate.contains('edgetpu') || self.precision == 'int8'",
            "target.precision: the Edge TPU delegate runs only fully int8-quantized models; set precision int8",
            lambda s: s.delegate is None or "edgetpu" not in s.delegate or s.precision == "int8",
            ".precision",
        ),
        Rule(
            "!has(self.executionProvider) || self.runtime == 'onnxruntime'",
            "target.executionProvider applies to runtime onnxruntime only; remove it or use runtime onnxruntime",
            lambda s: s.execution_provider is None or s.runtime == "onnxruntime",
            ".executionProvider",
        ),
        Rule(
            "!has(self.delegate) || self.runtime == 'litert'",
            "target.delegate applies to runtime litert only; remove it or use runtime litert",
            lambda s: s.delegate is None or s.runtime == "litert",
            ".delegate",
        ),
    )


TAINT_KEY_RULE = Rule(
    f"self == '' || (self.matches(r'{LABEL_KEY}') && !self.matches(r'{LONG_PREFIX}'))",
    f"tolerations[].key must be a taint key: {LABEL_KEY_HINT}",
    lambda v: v == "" or is_label_key(v),
)


class Toleration(Model):
    """A pod toleration (core/v1 Toleration) added to the inference pods of this class."""

    key: Annotated[str, Field(max_length=317), *checked(TAINT_KEY_RULE)] | None = None
    """The taint key to tolerate; empty with operator Exists tolerates every taint."""
    operator: Literal["Exists", "Equal"] | None = None
    """Exists or Equal (Kubernetes' default is Equal)."""
    value: Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)] | None = None
    """The taint value to match with operator Equal (a label value)."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """The taint effect to tolerate; empty tolerates every effect."""
    toleration_seconds: int | None = None
    """For NoExecute: how long the pod stays bound after the taint appears."""

    cel_rules = (
        Rule(
            "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
            "tolerations[].operator: a toleration without a key must use operator Exists (it then tolerates every"
            " taint); set key, or operator: Exists",
            lambda s: bool(s.key) or s.operator == "Exists",
            ".operator",
        ),
        Rule(
            "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
            "tolerations[].value must be empty with operator Exists; remove value or use operator: Equal",
            lambda s: s.operator != "Exists" or not s.value,
            ".value",
        ),
        Rule(
            "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
            "tolerations[].tolerationSeconds applies to effect NoExecute only; remove it or set effect: NoExecute",
            lambda s: s.toleration_seconds is None or s.effect == "NoExecute",
            ".tolerationSeconds",
        ),
    )


class DeviceMount(Model):
    """A host device or directory mounted into the inference container, e.g. /dev/apex_0."""

    name: Annotated[str, Field(min_length=1, max_length=59, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")]
    """Volume name (a DNS label of at most 59 characters: the pod's volume is dev-<name>), unique within the
    profile."""
    host_path: Annotated[str, Field(min_length=1, max_length=4096, pattern=ABSOLUTE_PATH), *checked(HOST_PATH_RULE)]
    """Absolute path on the node, without '..'."""
    mount_path: Path
    """Absolute path inside the container."""
    read_only: bool = False
    """Mount read-only."""


class Budget(Model):
    """Resource limits a compiled variant must fit on this hardware."""

    max_model_size_bytes: Annotated[int, Field(ge=1)] | None = None
    """Largest model file, in bytes, the device can hold; larger variants fail to compile."""
    max_memory_bytes: Annotated[int, Field(ge=32 * 2**20)] | None = None
    """Memory limit, in bytes, of the inference container (at least 32 MiB; without it 1 GiB); the
    container is OOM-killed above it."""


EXTENDED_RESOURCE = rf"^{SUBDOMAIN}/[A-Za-z0-9]([-A-Za-z0-9_.]{{0,61}}[A-Za-z0-9])?$"
EXTENDED_LONG_PREFIX = r"^[^/]{245,}/"  # Kubernetes checks "requests.<name>": the prefix leaves room for it
EXTENDED_RESOURCES_RULE = Rule(
    f"self.all(k, k.matches(r'{EXTENDED_RESOURCE}') && !k.matches(r'{EXTENDED_LONG_PREFIX}')"
    " && !k.contains('kubernetes.io/'))",
    "extendedResources: every key must be an extended resource name as a device plugin advertises it: a domain"
    " outside kubernetes.io (reserved), '/' and a name of at most 63 characters, e.g. nvidia.com/gpu (cpu and"
    " memory are not extended resources)",
    lambda m: all(re.fullmatch(EXTENDED_RESOURCE, k) and not re.match(EXTENDED_LONG_PREFIX, k)
                  and "kubernetes.io/" not in k for k in m),
)
UNIQUE_MOUNT_PATHS = Rule(
    "self.all(m, self.exists_one(n, n.mountPath == m.mountPath))",
    "deviceMounts: each mountPath may appear once (Kubernetes refuses two mounts at one path)",
    lambda ms: len({m.mount_path for m in ms}) == len(ms),
)
NOT_THE_CACHE = Rule(
    f"self.all(m, m.mountPath != '{RUNTIME_CACHE_MOUNT}')",
    f"deviceMounts: {RUNTIME_CACHE_MOUNT} is where the runtime reads the model cache; mount the device elsewhere",
    lambda ms: all(m.mount_path != RUNTIME_CACHE_MOUNT for m in ms),
)


NOT_ROOT = r"^/+$"
NOT_ROOT_RULE = Rule(
    f"!self.matches(r'{NOT_ROOT}')",
    "localDataPaths[].hostPath must not be '/': allow the one directory that holds the training data,"
    " e.g. /var/lib/edgefleet-data",
    lambda v: re.fullmatch(NOT_ROOT, v) is None,
)
Namespaces = Annotated[list[Name], Field(max_length=256, json_schema_extra={"x-kubernetes-list-type": "set"})]


class LocalDataPath(Model):
    """A node directory FederatedTraining clients of some namespaces may read (mounted read-only)."""

    host_path: Annotated[
        str, Field(min_length=1, max_length=4096, pattern=ABSOLUTE_PATH), *checked(HOST_PATH_RULE),
        *checked(NOT_ROOT_RULE),
    ]
    """Absolute directory on the nodes of this class, not '/' and without '..'; a FederatedTraining's
    spec.localData.hostPath must be it or a folder below it."""
    namespaces: Annotated[list[Name], Field(min_length=1, max_length=256,
                                            json_schema_extra={"x-kubernetes-list-type": "set"})]
    """Namespaces whose FederatedTrainings may read it (at least one)."""


def is_privileged(spec: HardwareProfileSpec) -> bool:
    """A class whose pods Pod Security `restricted` refuses: a privileged container or host device paths."""
    return spec.privileged or bool(spec.device_mounts)


def _short_name(what: str) -> Rule:
    return Rule(
        "self.metadata.name.size() <= 63",
        f"metadata.name: {what}; choose a name of at most 63 characters",
        lambda s: len(s.metadata.get("name") or "") <= 63,
    )


class HardwareProfileSpec(Model):
    """One class of edge hardware: which nodes belong to it and how models run there."""

    node_selector: LabelSelector
    """Nodes of this class, by their labels (Node Feature Discovery, GPU feature discovery,
    KubeEdge, kubernetes.io/arch)."""
    priority: Annotated[int, Field(ge=0, le=1000)] = 0
    """When a node matches several profiles, the highest priority wins (0..1000)."""
    target: Target
    """What models are compiled to for this hardware."""
    runtime_image: Image
    """The inference server image for this hardware, e.g. ghcr.io/edgefleet/runtime-cpu:0.1.0."""
    extended_resources: Annotated[
        dict[AnyKey, Annotated[str, Field(max_length=16, pattern=r"^[1-9][0-9]*$")]],
        Field(max_length=16),
        *checked(EXTENDED_RESOURCES_RULE),
    ] = Field(default_factory=dict)
    """Extended resources requested and limited per pod, name to whole-number quantity,
    e.g. {"nvidia.com/gpu": "1"}."""
    runtime_class_name: Annotated[str, Field(max_length=253, pattern=DNS_SUBDOMAIN)] | None = None
    """RuntimeClass for the inference pods, e.g. nvidia."""
    tolerations: Annotated[list[Toleration], Field(max_length=32)] = Field(default_factory=list)
    """Tolerations for the taints of these nodes (e.g. node-role.kubernetes.io/edge:NoSchedule)."""
    device_mounts: Annotated[
        list[DeviceMount],
        Field(max_length=16, json_schema_extra=list_map("name")),
        *checked(UNIQUE_MOUNT_PATHS),
        *checked(NOT_THE_CACHE),
    ] = Field(default_factory=list)
    """Host devices mounted into the inference container."""
    privileged: bool = False
    """Run the inference container privileged (some USB accelerators need it to reach /dev/bus/usb)."""
    budget: Budget | None = None
    """Optional model-size and memory limits of this hardware."""
    allowed_namespaces: Namespaces | None = None
    """Namespaces whose EdgeDeployments may use this class. Omitted or empty: every namespace for an
    unprivileged class, none for a privileged one (privileged: true or deviceMounts), whose pods Pod Security
    `restricted` and `baseline` refuse; a cluster admin lists the namespaces trusted with such pods."""
    local_data_paths: Annotated[list[LocalDataPath], Field(max_length=16)] = Field(default_factory=list)
    """Node directories FederatedTraining clients on this class's nodes may read, per namespace; omitted:
    none (a FederatedTraining naming any other spec.localData.hostPath fails)."""


class HardwareProfileStatus(Model):
    """What the operator observed about this profile."""

    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The .metadata.generation this status describes."""
    conditions: Conditions = Field(default_factory=list)
    """Latest observations of the profile's state."""
    matched_nodes: Annotated[int, Field(ge=0)] | None = None
    """Nodes for which this profile is the winning match."""


class HardwareProfile(ObjectBase):
    """A class of edge hardware (cluster-scoped): node selector, compile target, runtime image,
    accelerator resources, tolerations and device mounts."""

    api_version: Literal["edgefleet.io/v1alpha1"] = API_VERSION
    kind: Literal["HardwareProfile"] = "HardwareProfile"
    spec: HardwareProfileSpec
    status: HardwareProfileStatus | None = None

    cel_rules = (_short_name("the name becomes a label value on the pods of this class"),)


# ======================= EdgeModel =======================

class ConfigMapKeyRef(Model):
    """A key of a ConfigMap in the object's namespace."""

    name: Name
    """ConfigMap name."""
    key: Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")]
    """Key within the ConfigMap (binaryData or data)."""


class SecretKeyRef(Model):
    """A key of a Secret in the object's namespace."""

    name: Name
    """Secret name."""
    key: Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")] = "key"
    """Key within the Secret."""


PEM_PUBLIC_KEY = r"^\s*-----BEGIN PUBLIC KEY-----\s[A-Za-z0-9+/=\s]+-----END PUBLIC KEY-----\s*$"
PEM_PUBLIC_KEY_RULE = Rule(
    f"self.matches(r'{PEM_PUBLIC_KEY}')",
    "encryption.publicKey must be one PEM public key (-----BEGIN PUBLIC KEY----- ... -----END PUBLIC KEY-----);"
    " make a pair with `edgefleet keygen encryption PREFIX` and paste PREFIX.pub",
    lambda v: re.fullmatch(PEM_PUBLIC_KEY, v) is not None,
)


class Encryption(Model):
    """Encryption at rest of this model's variants: AES-256-GCM under a fresh data key per variant, the data
    key wrapped for `publicKey` (ECDH-ES P-256). The operator and the compiler need no secret; nodes cache
    only ciphertext and the runtime decrypts in memory with the private half, from the Secret the
    EdgeDeployment names in spec.trust.decryptionKeySecret. To rotate, set a new publicKey: the next compile
    encrypts for it (a new digest rolls out) and pods keep serving the old variant until they are rolled."""

    public_key: Annotated[str, Field(min_length=1, max_length=1024), *checked(PEM_PUBLIC_KEY_RULE)]
    """PEM ECDSA P-256 public key (-----BEGIN PUBLIC KEY-----), e.g. from `edgefleet keygen encryption
    digits` (digits.pub here, digits.key into the runtime's Secret)."""


USER_INFO = r"^[a-z]+://[^/?#]*@"  # user[:password]@ before the host
URI_CREDENTIALS_RULE = Rule(
    f"!self.matches(r'{USER_INFO}')",
    "must not carry credentials (user:password@host): anyone who may read this object would see them, and the"
    " operator never sends credentials to a host a user names; remove them and make the source readable"
    " anonymously (a public https:// URL or registry repository), or put the file in a ConfigMap (configMap)",
    lambda v: re.match(USER_INFO, v) is None,
)
Uri = Annotated[str, Field(min_length=1, max_length=2048, pattern=r"^(oci|https|pvc)://\S+$"),
                *checked(URI_CREDENTIALS_RULE)]


class DataRef(Model):
    """Where a data set lives: a URI or a ConfigMap key (an .npz archive keyed by model input name)."""

    uri: Uri | None = None
    """oci://, https:// or pvc://<claim>/<path> location of the data."""
    config_map: ConfigMapKeyRef | None = None
    """A ConfigMap key holding the data (small data sets only)."""

    cel_rules = (
        Rule(
            "has(self.uri) != has(self.configMap)",
            "data reference: set exactly one of uri or configMap",
            lambda s: (s.uri is None) != (s.config_map is None),
        ),
    )


class Source(Model):
    """Where the trained model is and, optionally, its expected digest."""

    uri: Uri | None = None
    """oci://registry/repo:tag, https://host/path or pvc://<claim>/<path> of the model file."""
    config_map: ConfigMapKeyRef | None = None
    """A ConfigMap key holding the model (tiny models only; ConfigMaps are limited to 1 MiB)."""
    digest: Digest | None = None
    """Expected sha256 of the model file, "sha256:" + 64 lowercase hex digits; the operator refuses
    a source whose bytes do not match."""

    cel_rules = (
        Rule(
            "has(self.uri) != has(self.configMap)",
            "source: set exactly one of source.uri or source.configMap",
            lambda s: (s.uri is None) != (s.config_map is None),
        ),
    )


class AccuracyBudget(Model):
    """How much accuracy an optimized variant may lose against the original model."""

    max_accuracy_drop: Annotated[float, Field(ge=0, le=100)] | None = None
    """Largest allowed drop in top-1 accuracy, in percentage points (0..100), measured on the
    evaluation data."""
    min_cosine: Annotated[float, Field(ge=0, le=1)] | None = None
    """Smallest allowed mean cosine similarity (0..1) between the outputs of the original and the
    optimized model."""

    cel_rules = (
        Rule(
            "has(self.maxAccuracyDrop) || has(self.minCosine)",
            "accuracyBudget: set maxAccuracyDrop, minCosine or both (or remove accuracyBudget)",
            lambda s: s.max_accuracy_drop is not None or s.min_cosine is not None,
        ),
    )


INPUT_NAME = r"^[^=\s]+$"  # the compiler takes NAME=1x3x48x192
INPUT_NAMES = Rule(
    f"self.all(k, k.matches(r'{INPUT_NAME}'))",
    "optimization.inputShapes: keys are model input names without '=' or whitespace, e.g. {\"x\": [1, 3, 48, 192]}",
    lambda m: all(re.fullmatch(INPUT_NAME, k) for k in m),
)


STUDENT = r"^mlp:\[[1-9][0-9]{0,3}(,[1-9][0-9]{0,3}){0,3}\]$"
STUDENT_RULE = Rule(
    f"self.matches(r'{STUDENT}')",
    "distillation.student must name an architecture: mlp:[H] or mlp:[H1,H2] (1 to 4 hidden layers of 1..9999"
    " units, no spaces), e.g. mlp:[64]",
    lambda v: re.fullmatch(STUDENT, v) is not None,
)
TRAIN_SEED = Annotated[int, Field(ge=0, le=2**31 - 1)]
TRAIN_DEADLINE = Annotated[int, Field(ge=1, le=86_400)]


class Pruning(Model):
    """Structured pruning: whole filters of each convolution and hidden units of each inner fully connected
    layer are removed (smallest L1 norm first), then the smaller model is fine-tuned on the calibration inputs
    against the source model's outputs. The `pruned` and `pruned+int8` candidates are measured and gated on
    the accuracy budget like every candidate."""

    ratio: Annotated[float, Field(ge=0.05, le=0.9)] = 0.5
    """Fraction of the filters (hidden units) removed from every prunable layer, 0.05 to 0.9."""
    epochs: Annotated[int, Field(ge=0, le=500)] = 10
    """Fine-tuning epochs over the transfer set built from the calibration inputs (0: no fine-tuning)."""
    seed: TRAIN_SEED = 0
    """Seed of the fine-tuning: the same seed, data and model give the same bytes."""
    deadline_seconds: TRAIN_DEADLINE = 900
    """Longest the fine-tuning may run; past it the pruned candidates fail with TrainingDeadlineExceeded."""


class Distillation(Model):
    """Knowledge distillation: a small student network is trained on the source model's (the teacher's) soft
    outputs over the transfer inputs, exported to ONNX, then quantized and measured like every candidate
    (`student`, `student+int8`)."""

    student: Annotated[str, Field(min_length=1, max_length=64), *checked(STUDENT_RULE)]
    """The student's architecture: mlp:[H1,...] (a fully connected network with these hidden widths)."""
    data: Literal["calibration"] = "calibration"
    """Where the transfer inputs come from: calibration (optimization.calibration, augmented by mixing
    samples); the teacher labels them."""
    epochs: Annotated[int, Field(ge=1, le=1000)] = 60
    """Training epochs over the transfer set."""
    temperature: Annotated[float, Field(ge=0.5, le=20)] = 4.0
    """Softmax temperature of the soft targets (higher: more of the teacher's ranking of wrong classes)."""
    seed: TRAIN_SEED = 0
    """Seed of the training: the same seed, data and teacher give the same bytes."""
    deadline_seconds: TRAIN_DEADLINE = 900
    """Longest the training may run; past it the student candidates fail with TrainingDeadlineExceeded."""


class Optimization(Model):
    """How the model may be optimized per hardware class: quantization, calibration data, pruning
    and the accuracy the result must keep. Variants that break the accuracy budget are rejected
    and the next less aggressive option is tried."""

    quantization: Quantization = "auto"
    """auto (pick per target and model), none, fp16, dynamic-int8 or static-int8
    (static-int8 needs calibration data)."""
    calibration: DataRef | None = None
    """Representative inputs for static int8 calibration."""
    sparsity: Annotated[float, Field(ge=0, le=0.95)] = 0.0
    """Fraction of weights to prune by magnitude, 0 (none) to 0.95."""
    accuracy_budget: AccuracyBudget | None = None
    """The accuracy a variant must keep; checked on the evaluation data."""
    evaluation: DataRef | None = None
    """Held-out inputs (with labels under `y` for accuracy) used to measure each variant."""
    input_shapes: Annotated[
        dict[Annotated[str, Field(min_length=1, max_length=256)],
             Annotated[list[Annotated[int, Field(ge=1, le=1_000_000)]], Field(min_length=1, max_length=8)]],
        Field(max_length=16),
        *checked(INPUT_NAMES),
    ] | None = None
    """Every dim, batch included, of model inputs whose dims are dynamic, by input name, e.g.
    {"x": [1, 3, 48, 192]}. Without it (or evaluation data, or the model's metadata) quantization auto
    refuses a model whose input dims it cannot know."""
    pruning: Pruning | None = None
    """Structured pruning (filters/hidden units removed, then fine-tuned): adds the pruned and pruned+int8
    candidates. Needs calibration data."""
    distillation: Distillation | None = None
    """Knowledge distillation into a smaller student: adds the student and student+int8 candidates. Needs
    calibration data (the transfer inputs)."""
    selection: Literal["host", "onTarget"] | None = None
    """Where the chosen variant is measured: onTarget runs the candidates that passed the accuracy gate
    in a benchmark Job on one node of each hardware class and picks the fastest there; host keeps the
    compile host's numbers. Omitted means onTarget where a class has a schedulable node, else host (a
    condition says which was used)."""

    cel_rules = (
        Rule(
            "self.quantization != 'static-int8' || has(self.calibration)",
            "optimization.calibration is required when optimization.quantization is static-int8:"
            " add calibration data (uri or configMap) or choose dynamic-int8",
            lambda s: s.quantization != "static-int8" or s.calibration is not None,
            ".calibration",
        ),
        Rule(
            "!has(self.pruning) || has(self.calibration)",
            "optimization.calibration is required when optimization.pruning is set: the pruned model is"
            " fine-tuned on those inputs; add calibration data (uri or configMap) or remove pruning",
            lambda s: s.pruning is None or s.calibration is not None,
            ".calibration",
        ),
        Rule(
            "!has(self.distillation) || has(self.calibration)",
            "optimization.calibration is required when optimization.distillation is set: the student learns"
            " the teacher's outputs on those inputs (distillation.data: calibration); add calibration data"
            " (uri or configMap) or remove distillation",
            lambda s: s.distillation is None or s.calibration is not None,
            ".calibration",
        ),
    )


class TargetProfiles(Model):
    """Which HardwareProfiles to compile for: a list of names or a label selector."""

    names: Annotated[
        list[Name], Field(min_length=1, max_length=32, json_schema_extra={"x-kubernetes-list-type": "set"})
    ] | None = None
    """HardwareProfile names."""
    selector: LabelSelector | None = None
    """HardwareProfile labels."""

    cel_rules = (
        Rule(
            "has(self.names) != has(self.selector)",
            "targetProfiles: set exactly one of targetProfiles.names or targetProfiles.selector",
            lambda s: (s.names is None) != (s.selector is None),
        ),
    )


class EdgeModelSpec(Model):
    """A trained model and how to optimize it for each class of edge hardware."""

    source: Source
    """Where the trained model is (exactly one of uri or configMap) and its expected digest."""
    format: Literal["onnx", "tflite"]
    """Format of the source model: onnx or tflite."""
    optimization: Optimization = Field(default_factory=Optimization)
    """How the model may be optimized per hardware class: quantization (auto picks per target),
    calibration data for static int8, magnitude pruning, and the accuracy budget every variant must
    keep, measured on the evaluation data. A variant that breaks the budget is rejected and the
    next less aggressive option is tried."""
    target_profiles: TargetProfiles | None = None
    """HardwareProfiles to compile for; omitted means every profile that matches at least one node."""
    encryption: Encryption | None = None
    """Encrypt the published variants at rest (AES-256-GCM); omitted means they are stored in the clear."""
    preprocessing: Preprocessing | None = None
    """How the runtime turns an encoded input (JPEG/PNG) into the model's tensor; the same on every class."""
    postprocessing: Postprocessing | None = None
    """What the runtime adds to the model's answer (softmax, top-k with labels, or detection boxes); the same on
    every class."""

    cel_rules = (
        Rule(
            "!has(self.postprocessing) || !has(self.postprocessing.detection) || has(self.preprocessing)",
            "spec.postprocessing.detection: needs spec.preprocessing.image (boxes are fractions of the model's "
            "input, whose size it gives); declare it",
            lambda s: s.postprocessing is None or s.postprocessing.detection is None or s.preprocessing is not None,
            ".postprocessing.detection",
        ),
    )


class OnTargetResult(Model):
    """A variant measured on a node of its hardware class by the benchmark Job (edgefleet-runtime bench)."""

    node: Name
    """The node the numbers came from."""
    latency_p50_ms: Annotated[float, Field(ge=0)] | None = None
    """Median single-input latency at 1 thread, in milliseconds."""
    latency_p95_ms: Annotated[float, Field(ge=0)] | None = None
    """95th percentile single-input latency at 1 thread, in milliseconds."""
    threads: Annotated[int, Field(ge=1, le=1024)] | None = None
    """N of the N-thread numbers: the node's CPUs."""
    latency_p50_ms_n: Annotated[float, Field(ge=0)] | None = None
    """Median single-input latency at N threads, in milliseconds."""
    latency_p95_ms_n: Annotated[float, Field(ge=0)] | None = None
    """95th percentile single-input latency at N threads, in milliseconds."""
    throughput_per_second: Annotated[float, Field(ge=0)] | None = None
    """Evaluation samples per second at N threads."""
    peak_memory_bytes: Annotated[int, Field(ge=0)] | None = None
    """Peak resident memory of the measuring process (runtime + model)."""
    load_seconds: Annotated[float, Field(ge=0)] | None = None
    """Seconds to open and warm the variant."""
    accuracy: Annotated[float, Field(ge=0, le=1)] | None = None
    """Top-1 accuracy on the evaluation data, measured on the node."""
    error: ShortText | None = None
    """Why the variant could not be measured on the node."""
    tensorrt_engine_key: Annotated[str, Field(max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9.-]*$")] | None = None
    """The TensorRT engine the benchmark built on the node: its folder under the node cache's tensorrt/, keyed by
    variant digest + TensorRT + CUDA + GPU compute capability (+ JetPack). Serve pods on nodes with the same GPU
    stack load it instead of building it; absent where TensorRT did not run or its cache was off."""


class VariantCandidate(Model):
    """A candidate the compiler built inside the accuracy budget and published, so a benchmark Job can
    measure it on a node of the class (optimization.selection onTarget)."""

    name: Annotated[str, Field(min_length=1, max_length=63)]
    """The candidate's name in the compile report, e.g. fp32, static-int8, openvino-int8."""
    artifact: ShortText
    """Where the candidate is stored (OCI reference or store path)."""
    digest: Digest
    """sha256 of the candidate file."""
    format: Format | None = None
    """File format of the candidate."""
    precision: Precision | None = None
    """Numeric precision of the candidate."""
    quantization: Quantization | None = None
    """The quantization applied (never auto)."""
    size_bytes: Annotated[int, Field(ge=0)] | None = None
    """Size of the candidate file in bytes."""
    latency_p50_ms: Annotated[float, Field(ge=0)] | None = None
    """Median single-input latency at 1 thread measured by the compiler on its host, in milliseconds."""
    accuracy_delta: float | None = None
    """Accuracy change against the source model in percentage points (negative is a loss)."""
    agreement: Annotated[float, Field(ge=0, le=1)] | None = None
    """Top-1 agreement with the source model on the evaluation data (0..1), e.g. of a distilled student."""
    on_target: OnTargetResult | None = None
    """The candidate's numbers from the benchmark Job on a node of the class."""


class Variant(Model):
    """One compiled variant of the model, for one HardwareProfile."""

    profile: Name
    """The HardwareProfile this variant is for."""
    format: Format | None = None
    """File format of the variant."""
    precision: Precision | None = None
    """Numeric precision of the variant."""
    quantization: Quantization | None = None
    """The quantization actually applied (never auto)."""
    artifact: ShortText | None = None
    """Where the variant is stored (OCI reference or store path)."""
    digest: Digest | None = None
    """sha256 of the variant file."""
    size_bytes: Annotated[int, Field(ge=0)] | None = None
    """Size of the variant file in bytes."""
    latency_p50_ms: Annotated[float, Field(ge=0)] | None = None
    """Median single-input latency measured by the compiler, in milliseconds."""
    on_target: OnTargetResult | None = None
    """The numbers measured on a node of the class (optimization.selection onTarget)."""
    accuracy_delta: float | None = None
    """Accuracy change against the source model in percentage points (negative is a loss)."""
    selection: Literal["host", "onTarget"] | None = None
    """How this variant was chosen among the candidates: onTarget (fastest p50 at 1 thread on onTarget.node)
    or host (the compile host's numbers; the EdgeModel's OnTargetSelected condition says why when the
    benchmark was not used)."""
    candidates: Annotated[list[VariantCandidate], Field(max_length=8)] | None = None
    """The published candidates inside the accuracy budget, the chosen one first."""
    state: Literal["Pending", "Compiling", "Benchmarking", "Ready", "Failed"] = "Pending"
    """Pending, Compiling, Benchmarking (its candidates are measured on a node of the class), Ready or Failed."""
    reason: Reason | None = None
    """Machine-readable reason for the state."""
    message: Annotated[str, Field(max_length=4096)] | None = None
    """Human-readable detail, e.g. why compilation failed."""


class EdgeModelStatus(Model):
    """What the operator has compiled."""

    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The .metadata.generation this status describes."""
    conditions: Conditions = Field(default_factory=list)
    """Latest observations; Ready is True when every wanted variant is Ready."""
    variants: Annotated[
        list[Variant],
        Field(max_length=64, json_schema_extra=list_map("profile")),
    ] = Field(default_factory=list)
    """One entry per target HardwareProfile."""
    variants_ready: Annotated[str, Field(max_length=16)] | None = None
    """Ready variants out of wanted ones, e.g. "3/4" (shown by kubectl get)."""


class EdgeModel(ObjectBase):
    """A trained model (ONNX or TFLite) that edgefleet compiles into one optimized variant per
    hardware class."""

    api_version: Literal["edgefleet.io/v1alpha1"] = API_VERSION
    kind: Literal["EdgeModel"] = "EdgeModel"
    spec: EdgeModelSpec
    status: EdgeModelStatus | None = None


# ======================= EdgeDeployment =======================

NONZERO_PERCENT = r"^(100|[1-9][0-9]?)%$"
MAX_UNAVAILABLE = Rule(
    "type(self) == int ? self >= 1 : self.matches('" + NONZERO_PERCENT + "')",
    "rollout.maxUnavailable must be a whole number >= 1 or a percentage from 1% to 100%, e.g. 25% (Kubernetes"
    " refuses 0: no extra pod is started during an update, so one must be allowed to go)",
    lambda v: v >= 1 if isinstance(v, int) else re.fullmatch(NONZERO_PERCENT, v) is not None,
)

MAX_SURGE = Rule(
    "type(self) == int ? self >= 1 : self.matches('" + NONZERO_PERCENT + "')",
    "rollout.maxSurge must be a whole number >= 1 or a percentage from 1% to 100%, e.g. 1 (omit it for no surge)",
    lambda v: v >= 1 if isinstance(v, int) else re.fullmatch(NONZERO_PERCENT, v) is not None,
)


class ModelRef(Model):
    """The EdgeModel to serve, in the same namespace."""

    name: Name
    """EdgeModel name."""


class HealthGate(Model):
    """When a wave counts as healthy."""

    min_ready_seconds: Annotated[int, Field(ge=0, le=3600)] = 10
    """Seconds a new pod must stay ready before it counts."""
    timeout_seconds: Annotated[int, Field(ge=1, le=86400)] = 600
    """Seconds a wave may take to become healthy before the rollout is declared failed."""

    cel_rules = (
        Rule(
            "self.timeoutSeconds > self.minReadySeconds",
            "healthGate.timeoutSeconds must be greater than healthGate.minReadySeconds",
            lambda s: s.timeout_seconds > s.min_ready_seconds,
            ".timeoutSeconds",
        ),
    )


Percent = Annotated[int, Field(ge=1, le=100)]


class RolloutGate(Model):
    """Limits a variant must meet on a node of its class (the benchmark Job's numbers) before the class
    rolls out to it; a variant that fails keeps the old one serving and marks the deployment Degraded."""

    max_latency_p95_ms: Annotated[float, Field(gt=0, le=3_600_000)] | None = None
    """Largest 95th percentile single-input latency on target, in milliseconds (at the runtime's threads)."""
    min_throughput: Annotated[float, Field(gt=0)] | None = None
    """Fewest evaluation samples per second on target."""
    max_memory_bytes: Annotated[int, Field(ge=1)] | None = None
    """Largest peak resident memory on target, in bytes."""

    cel_rules = (
        Rule(
            "has(self.maxLatencyP95Ms) || has(self.minThroughput) || has(self.maxMemoryBytes)",
            "rollout.gate: set at least one of maxLatencyP95Ms, minThroughput or maxMemoryBytes, or remove the gate",
            lambda s: any(v is not None for v in (s.max_latency_p95_ms, s.min_throughput, s.max_memory_bytes)),
        ),
    )


class Prefetch(Model):
    """Fetch a new variant into every node's cache (a delta where the node holds the variant it serves) while the
    old one keeps serving, then activate it. The runtime pods read their orders from their annotations
    (`serve --control-dir`, a downward-API volume): turning this on changes the pod template once (pods restart
    once), later variants need no new pod template."""

    deadline_seconds: Annotated[int, Field(ge=10, le=604800)] = 1800
    """Seconds activation waits for every node to hold the new variant; after it, activation goes on with the
    nodes that hold it (the others activate once they do). A node whose fetch failed is listed in the class's
    status.classes[].prefetch with the reason."""


class Activation(Model):
    """When and how a prefetched variant becomes the served one (needs rollout.prefetch)."""

    in_place: bool = True
    """Switch inside the running runtime (loaded beside the old model, then swapped; requests in flight finish
    on the old one; no pod restart). false: replace the pods, which start from the cached variant."""
    after: datetime | None = None
    """Hold activation until this time (RFC 3339, e.g. 2026-12-08T02:00:00Z); prefetch and shadow go on."""
    manual: bool = False
    """Hold activation until approvedDigest names the new variant's digest."""
    approved_digest: Digest | None = None
    """With manual: the variant digest (sha256:...) approved for activation (see status.classes[].prefetch)."""

    cel_rules = (
        Rule(
            "!has(self.approvedDigest) || self.manual",
            "rollout.activation.approvedDigest only applies with manual: true; set manual: true or remove it",
            lambda s: s.approved_digest is None or s.manual,
            ".approvedDigest",
        ),
    )


class ShadowPhase(Model):
    """Before activation, the runtimes on the first wave's nodes mirror a sample of live requests to the new
    variant; clients get only the served model's answers. The rollout goes on only when the new variant agrees
    with the served one on at least minAgreement of minRequests compared samples, else it stops with Degraded
    reason ShadowDisagreement and the old variant keeps serving (needs rollout.prefetch)."""

    sample_rate: Annotated[float, Field(gt=0, le=1)] = 0.1
    """Share of requests mirrored to the new variant (0 < rate <= 1)."""
    min_requests: Annotated[int, Field(ge=1, le=10_000_000)] = 200
    """Compared samples (over the shadowing nodes) needed for a verdict."""
    min_agreement: Annotated[float, Field(ge=0, le=1)] = 0.95
    """Lowest agreement (over the model's outputs) that lets the rollout go on, from 0 to 1."""
    max_duration_seconds: Annotated[int, Field(ge=10, le=604800)] = 3600
    """Seconds to gather minRequests samples; fewer by then stops the rollout (reason ShadowInconclusive)."""
    agreement: Literal["top1", "cosine"] = "top1"
    """top1: share of samples with the same argmax; cosine: mean cosine similarity of the outputs."""



class Rollout(Model):
    """How a new model variant reaches the fleet."""

    max_unavailable: Annotated[
        int | str,
        Field(json_schema_extra={"x-kubernetes-int-or-string": True}),
        *checked(MAX_UNAVAILABLE),
    ] = "25%"
    """Pods per hardware class that may be unavailable during an update: a number or a percentage."""
    max_surge: Annotated[
        int | str,
        Field(json_schema_extra={"x-kubernetes-int-or-string": True}),
        *checked(MAX_SURGE),
    ] | None = None
    """Nodes per hardware class whose new pod starts beside the old one during an update (a number or a
    percentage); the old pod goes once the new one is Ready, so those nodes keep serving (in PerNode mode
    maxUnavailable then does not apply: no node loses its pod). Not with waves or canaryPercent. Classes whose
    profile asks for extended resources (a GPU) roll without it: a second pod could not get the device the
    first one holds. Omitted: 1 where spec.trust.publicKeysSecret is set (a variant the nodes refuse never
    takes a node's serving pod away), else none."""
    waves: Annotated[
        list[Percent], Field(min_length=1, max_length=10, json_schema_extra={"x-kubernetes-list-type": "set"})
    ] | None = None
    """Cumulative percentages of nodes updated per wave, ascending and ending at 100, e.g. [10, 50, 100].
    Exclusive with canaryPercent. PerNode mode only; Replicas mode rolls with maxUnavailable."""
    canary_percent: Annotated[int, Field(ge=1, le=99)] | None = None
    """Update this percentage of nodes first, then the rest once healthy. Exclusive with waves.
    PerNode mode only."""
    health_gate: HealthGate = Field(default_factory=HealthGate)
    """When a wave counts as healthy."""
    auto_rollback: bool = True
    """Roll back to the last healthy variant when a wave fails its health gate."""
    gate: RolloutGate | None = None
    """On-target limits (latency, throughput, memory) a new variant must meet before a class rolls out."""
    prefetch: Prefetch | None = None
    """Fetch new variants to the nodes before activating them (and publish deltas); omitted: pods are replaced
    and fetch at activation. PerNode mode with runtime.workers 1 only."""
    activation: Activation | None = None
    """When and how a prefetched variant is activated (in place by default); needs prefetch."""
    shadow: ShadowPhase | None = None
    """Compare the new variant with the served one on live traffic before activation; needs prefetch."""

    cel_rules = (
        Rule(
            "!has(self.maxSurge) || (!has(self.waves) && !has(self.canaryPercent))",
            "rollout.maxSurge does not go with waves or canaryPercent (they replace pods themselves): "
            "remove maxSurge or the waves",
            lambda s: s.max_surge is None or (s.waves is None and s.canary_percent is None),
        ),
        Rule(
            "!(has(self.waves) && has(self.canaryPercent))",
            "rollout.waves and rollout.canaryPercent are exclusive: set one of them",
            lambda s: not (s.waves is not None and s.canary_percent is not None),
        ),
        Rule(
            "!has(self.waves) || size(self.waves) == 0 ||"
            " ([1, 2, 3, 4, 5, 6, 7, 8, 9].all(i, i >= size(self.waves) || self.waves[i - 1] < self.waves[i])"
            " && self.waves[size(self.waves) - 1] == 100)",
            "rollout.waves must be ascending and end at 100, e.g. [10, 50, 100]",
            lambda s: not s.waves
            or (all(a < b for a, b in zip(s.waves, s.waves[1:], strict=False)) and s.waves[-1] == 100),
            ".waves",
        ),
        Rule(
            "!has(self.activation) || has(self.prefetch)",
            "rollout.activation needs rollout.prefetch (a variant is activated once the nodes hold it): add"
            " prefetch: {} or remove activation",
            lambda s: s.activation is None or s.prefetch is not None,
            ".activation",
        ),
        Rule(
            "!has(self.maxSurge) || !has(self.prefetch)",
            "rollout.maxSurge does not go with rollout.prefetch (the operator switches or replaces the pods itself,"
            " no pod is surged): remove maxSurge or prefetch",
            lambda s: s.max_surge is None or s.prefetch is None,
            ".maxSurge",
        ),
        Rule(
            "!has(self.shadow) || has(self.prefetch)",
            "rollout.shadow needs rollout.prefetch (the candidate runs from the node cache): add prefetch: {}"
            " or remove shadow",
            lambda s: s.shadow is None or s.prefetch is not None,
            ".shadow",
        ),
    )


class RuntimeSettings(Model):
    """Settings of the inference server."""

    threads: Annotated[int, Field(ge=1, le=256)] | None = None
    """Inference threads per pod; omitted means one per CPU the pod may use."""
    port: Annotated[int, Field(ge=1, le=65535)] = 8080
    """Container port of the Open Inference Protocol v2 REST API."""
    grpc_port: Annotated[int, Field(ge=1, le=65535)] | None = None
    """Container port of the Open Inference Protocol v2 gRPC API (inference.GRPCInferenceService, as
    KServe and Triton serve it), e.g. 8081; omitted means REST only."""
    workers: Annotated[int, Field(ge=1, le=16)] = 1
    """Server processes per pod sharing the REST port, for throughput beyond one Python process. Each
    loads its own copy of the model (size the HardwareProfile's memory for it); the connection, body and
    concurrency caps are divided among them; gRPC runs in one. Not with spec.monitoring or
    spec.feedback.hardExamples, which keep their state in one process."""

    cel_rules = (
        Rule(
            "!has(self.grpcPort) || self.grpcPort != self.port",
            "runtime.grpcPort must differ from runtime.port (REST); pick another port, e.g. 8081",
            lambda s: s.grpc_port is None or s.grpc_port != s.port,
            ".grpcPort",
        ),
    )


class ServiceSettings(Model):
    """How the inference pods are exposed."""

    enabled: bool = True
    """Create a Service in front of the inference pods."""
    type: Literal["ClusterIP", "NodePort"] = "ClusterIP"
    """Service type: ClusterIP or NodePort."""
    port: Annotated[int, Field(ge=1, le=65535)] = 8080
    """Service port."""


class Trust(Model):
    """Which variants the nodes of this deployment accept: signatures checked by the fetch init container
    before anything enters the node cache and again by the runtime at every load, and the key that
    decrypts encrypted variants in memory."""

    public_keys_secret: Name | None = None
    """A Secret whose every key is a PEM ECDSA P-256 public key (`edgefleet keygen signing`, or cosign's
    cosign.pub); a variant's signature must verify with one of them. Omitted: signatures are not checked."""
    require_signature: bool = False
    """Refuse unsigned variants (without it only a present signature is checked); needs publicKeysSecret."""
    decryption_key_secret: SecretKeyRef | None = None
    """The Secret key holding the private half (PEM) of the EdgeModel's spec.encryption.publicKey, which
    decrypts its encrypted variants in memory; mounted only into the runtime container."""
    revoked_digests: Annotated[
        list[Digest], Field(max_length=256, json_schema_extra={"x-kubernetes-list-type": "set"})
    ] | None = None
    """Variant digests never to roll out, though validly signed: a variant later found bad, or an old one a
    rollback (or an edited EdgeModel status) would bring back. A class whose variant is listed keeps the pods
    it runs and is Degraded with reason VariantRevoked until a new variant is published."""

    cel_rules = (
        Rule(
            "!self.requireSignature || has(self.publicKeysSecret)",
            "spec.trust.requireSignature needs spec.trust.publicKeysSecret: name the Secret with the trusted"
            " public keys",
            lambda s: not s.require_signature or s.public_keys_secret is not None,
            ".publicKeysSecret",
        ),
    )


OCI_REPOSITORY = r"^oci://[^/\s]+/[^\s:@]+$"
OCI_REPOSITORY_RULE = Rule(
    f"self.matches(r'{OCI_REPOSITORY}')",
    "feedback.hardExamples.destination must be a repository without tag or digest, oci://HOST[:PORT]/REPOSITORY,"
    " e.g. oci://registry.example:5000/edgefleet/hard-examples (each batch gets its own tag)",
    lambda v: re.fullmatch(OCI_REPOSITORY, v) is not None,
)
OciRepository = Annotated[str, Field(min_length=7, max_length=2048), *checked(OCI_REPOSITORY_RULE)]


class DriftMonitoring(Model):
    """Compare what each hardware class sees with the EdgeModel's evaluation data (population stability
    index of the predicted classes, the confidence and the input level over the last `windowSize` predictions
    of a pod) and set the Drifting condition. Each runtime computes its reference from the evaluation data
    (spec.optimization.evaluation as a configMap) with the variant it serves; the operator reads the pods'
    /metrics every `intervalSeconds`, only for deployments with drift on."""

    threshold: Annotated[float, Field(gt=0, le=10)] = 0.2
    """PSI at or above which a statistic counts as drifted (0.1 moderate, 0.2 significant, the usual reading)."""
    window_size: Annotated[int, Field(ge=10, le=100_000)] = 1000
    """Predictions per pod compared with the evaluation data; Drifting is decided only on a full window."""
    interval_seconds: Annotated[int, Field(ge=5, le=3600)] = 60
    """How often the operator reads the drift numbers of the pods."""
    max_pods_per_class: Annotated[int, Field(ge=1, le=100)] = 10
    """Pods per hardware class read in one look (the first by name); bounds the operator's work on big fleets."""


class Monitoring(Model):
    """Fleet monitoring in the runtime: prediction confidence histogram, per-class counts and, with `drift`,
    the population stability index against the evaluation data, all on each pod's /metrics."""

    confidence_below: Annotated[float, Field(gt=0, le=1)] = 0.5
    """Top-1 probability under which a prediction counts as low-confidence (a metric)."""
    drift: DriftMonitoring | None = None
    """Compare live traffic with the evaluation data and set the Drifting condition; omitted: no drift check."""


class HardExamples(Model):
    """Low-confidence inputs (and the model's outputs) kept on the node and uploaded in batches as OCI
    artifacts, for retraining or calibration (`edgefleet examples pull`)."""

    confidence_below: Annotated[float, Field(gt=0, le=1)] = 0.5
    """Keep predictions whose top-1 probability is below this."""
    sample_rate: Annotated[float, Field(gt=0, le=1)] = 1.0
    """Share of the low-confidence predictions kept (0 < rate <= 1)."""
    max_bytes_per_node: Annotated[int, Field(ge=65536, le=1 << 40)] = 64 << 20
    """Bytes the spool may hold on a node (under the node cache); when full, new examples are dropped and
    counted, nothing spooled is lost."""
    destination: OciRepository
    """Repository the batches are pushed to, oci://HOST[:PORT]/REPOSITORY (tags are chosen per batch)."""
    batch_size: Annotated[int, Field(ge=1, le=10_000)] = 100
    """Examples per uploaded artifact at most."""
    upload_interval_seconds: Annotated[int, Field(ge=1, le=86400)] = 60
    """Seconds between uploads of what the spool holds (longer after a failed push, up to 10 minutes)."""


class Feedback(Model):
    """What the fleet sends back for the next training round."""

    hard_examples: HardExamples | None = None
    """Spool and upload the inputs the model is unsure about."""


class EdgeDeploymentSpec(Model):
    """Which nodes serve a model and how updates roll out."""

    model_ref: ModelRef
    """The EdgeModel to serve (same namespace)."""
    node_selector: LabelSelector = Field(default_factory=LabelSelector)
    """The fleet: nodes that should serve the model; empty selects every node."""
    mode: Literal["PerNode", "Replicas"] = "PerNode"
    """PerNode runs one server on every selected node (DaemonSet per class); Replicas runs
    `replicas` servers per hardware class (Deployment per class)."""
    replicas: Annotated[int, Field(ge=0, le=10000)] | None = None
    """Servers per hardware class; required with mode Replicas, not allowed with PerNode."""
    rollout: Rollout = Field(default_factory=Rollout)
    """How a new model variant reaches the fleet."""
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    """Settings of the inference server."""
    service: ServiceSettings = Field(default_factory=ServiceSettings)
    """How the inference pods are exposed."""
    trust: Trust | None = None
    """Signed and encrypted variants: the public keys that must have signed what the nodes fetch and
    serve, and the key that decrypts encrypted variants. Omitted: only the digest is checked."""
    monitoring: Monitoring | None = None
    """Confidence, class counts and drift metrics on each runtime pod; omitted: the runtime exports none."""
    feedback: Feedback | None = None
    """Hard examples spooled on the nodes and uploaded as OCI artifacts; omitted: none are kept."""
    pipeline: PipelineSpec | None = None
    """A data pipeline beside the runtime on each node: sources (files, MJPEG, RTSP/video) through the model to
    sinks (MQTT, webhook) with an on-disk queue for a lost uplink; needs the EdgeModel's spec.preprocessing."""

    cel_rules = (
        Rule(
            "self.mode != 'Replicas' || has(self.replicas)",
            "spec.replicas is required when mode is Replicas: set replicas or use mode PerNode",
            lambda s: s.mode != "Replicas" or s.replicas is not None,
            ".replicas",
        ),
        Rule(
            "self.mode != 'PerNode' || !has(self.replicas)",
            "spec.replicas is not allowed when mode is PerNode (one server per node): remove replicas"
            " or use mode Replicas",
            lambda s: s.mode != "PerNode" or s.replicas is None,
            ".replicas",
        ),
        Rule(
            "!has(self.runtime.grpcPort) || !has(self.service.port) || self.runtime.grpcPort != self.service.port",
            "spec.runtime.grpcPort is also the Service's gRPC port and must differ from spec.service.port (REST);"
            " pick another, e.g. 8081",
            lambda s: s.runtime.grpc_port is None or s.runtime.grpc_port != s.service.port,
            ".runtime.grpcPort",
        ),
        Rule(
            "!has(self.runtime.workers) || self.runtime.workers == 1"
            " || (!has(self.monitoring) && (!has(self.feedback) || !has(self.feedback.hardExamples)))",
            "spec.runtime.workers above 1 cannot be combined with spec.monitoring or spec.feedback.hardExamples"
            " (they keep their state in one server process): set runtime.workers to 1, or remove them",
            lambda s: s.runtime.workers == 1
            or (s.monitoring is None and not (s.feedback and s.feedback.hard_examples)),
            ".runtime.workers",
        ),
        Rule(
            "!has(self.rollout) || !has(self.rollout.prefetch) || self.mode == 'PerNode'",
            "spec.rollout.prefetch needs mode PerNode (one runtime per node holds the node's cache): use mode"
            " PerNode or remove rollout.prefetch",
            lambda s: s.rollout.prefetch is None or s.mode == "PerNode",
            ".rollout.prefetch",
        ),
        Rule(
            "!has(self.rollout) || !has(self.rollout.prefetch) || !has(self.runtime) || !has(self.runtime.workers)"
            " || self.runtime.workers == 1",
            "spec.rollout.prefetch cannot be combined with spec.runtime.workers above 1 (a switch in place happens"
            " in one server process): set runtime.workers to 1 or remove rollout.prefetch",
            lambda s: s.rollout.prefetch is None or s.runtime.workers == 1,
            ".rollout.prefetch",
        ),
    )


class NodeProblem(Model):
    """A node that did not do what it was asked, and why."""

    node: Annotated[str, Field(max_length=253)]
    """The node."""
    reason: ShortText
    """What went wrong (from the runtime's metrics, or why they could not be read)."""


class PrefetchProgress(Model):
    """Prefetch of a new variant on the nodes of one class."""

    digest: Digest
    """The variant being prefetched."""
    done: Annotated[int, Field(ge=0)] = 0
    """Nodes that hold it, verified."""
    pending: Annotated[int, Field(ge=0)] = 0
    """Nodes still fetching it (or not reporting yet)."""
    failed: Annotated[int, Field(ge=0)] = 0
    """Nodes whose fetch failed (retried by the runtime every 30 s)."""
    failures: Annotated[list[NodeProblem], Field(max_length=20)] = Field(default_factory=list)
    """The first failed nodes (by name) with the reason."""


class ShadowProgress(Model):
    """The shadow phase of a new variant in one class."""

    digest: Digest
    """The candidate variant."""
    samples: Annotated[int, Field(ge=0)] = 0
    """Samples compared so far on the shadowing nodes."""
    agreement: Annotated[float, Field(ge=0, le=1)] | None = None
    """Agreement so far (the lowest over outputs; spec.rollout.shadow.agreement says which kind)."""
    verdict: Literal["Pending", "Pass", "Fail"] = "Pending"
    """Pending until minRequests samples are compared, then Pass or Fail."""


class ClassStatus(Model):
    """Rollout state of one hardware class."""

    profile: Name
    """The HardwareProfile of this class."""
    desired: Annotated[int, Field(ge=0)] = 0
    """Pods wanted."""
    ready: Annotated[int, Field(ge=0)] = 0
    """Pods ready."""
    updated: Annotated[int, Field(ge=0)] = 0
    """Pods serving the wanted variant."""
    digest: Digest | None = None
    """Digest of the variant this class serves."""
    rollout: ShortText | None = None
    """Where a wave rollout stands: `wave 2/3`, `complete`, `rolled back` or `paused` (PerNode with waves)."""
    message: ShortText | None = None
    """Why this class is not fully served: its pods' state (e.g. `2/2 pods Pending: Insufficient
    nvidia.com/gpu`) or why its workload could not be applied; absent when nothing is wrong."""
    prefetch: PrefetchProgress | None = None
    """Where the prefetch of a new variant stands on the class's nodes (rollout.prefetch)."""
    shadow: ShadowProgress | None = None
    """What the shadow phase measured for the new variant (rollout.shadow)."""


class EdgeDeploymentStatus(Model):
    """What the operator has rolled out."""

    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The .metadata.generation this status describes."""
    conditions: Conditions = Field(default_factory=list)
    """Latest observations: Available, Progressing, Degraded."""
    classes: Annotated[
        list[ClassStatus],
        Field(max_length=64, json_schema_extra=list_map("profile")),
    ] = Field(default_factory=list)
    """Per hardware class: desired, ready and updated pods and the digest served."""
    unmatched_nodes: Annotated[int, Field(ge=0)] = 0
    """Selected nodes that match no HardwareProfile (nothing is run there)."""
    nodes_ready: Annotated[str, Field(max_length=32)] | None = None
    """Ready pods out of desired ones over all classes, e.g. "7/8" (shown by kubectl get)."""


class EdgeDeployment(ObjectBase):
    """Serves an EdgeModel on a fleet of edge nodes: the right variant, runtime and accelerator per
    hardware class, rolled out in health-gated waves."""

    api_version: Literal["edgefleet.io/v1alpha1"] = API_VERSION
    kind: Literal["EdgeDeployment"] = "EdgeDeployment"
    spec: EdgeDeploymentSpec
    status: EdgeDeploymentStatus | None = None

    cel_rules = (
        _short_name("the name becomes a label value on the inference pods"),
        Rule(
            "!has(self.spec.service) || !self.spec.service.enabled"
            f" || self.metadata.name.matches(r'{DNS_1035_LABEL}')",
            "metadata.name: with spec.service.enabled the name is also the Service's name, which must start with"
            " a letter and hold only lowercase letters, digits and '-'; rename the EdgeDeployment or set"
            " spec.service.enabled: false",
            lambda s: not s.spec.service.enabled or "name" not in s.metadata
            or re.fullmatch(DNS_1035_LABEL, s.metadata["name"]) is not None,
        ),
    )


KINDS: dict[str, type[ObjectBase]] = {
    "HardwareProfile": HardwareProfile,
    "EdgeModel": EdgeModel,
    "EdgeDeployment": EdgeDeployment,
}
