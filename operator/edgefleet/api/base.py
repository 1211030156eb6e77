"""Shared building blocks: the base model, validation rules, label selectors, conditions.

A `Rule` is one cross-field check written twice, once in CEL for the API server
(`x-kubernetes-validations`) and once in Python for pydantic, with one message for both, so a user
gets the same explanation from `kubectl apply` and from `edgefleet` tooling.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal, NamedTuple

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

GROUP = "edgefleet.io"
VERSION = "v1alpha1"
API_VERSION: Literal["edgefleet.io/v1alpha1"] = "edgefleet.io/v1alpha1"  # GROUP/VERSION


class Rule(NamedTuple):
    """A cross-field rule: CEL for the API server, `check` for pydantic, one message for both."""

    rule: str
    message: str
    check: Callable[[Any], bool]
    field_path: str | None = None  # CEL fieldPath relative to the object, e.g. ".replicas"


def rule_error(rule: Rule) -> PydanticCustomError:
    """The pydantic error for a broken rule; `format_errors` adds its fieldPath to the location."""
    return PydanticCustomError("edgefleet_rule", rule.message, {"field_path": rule.field_path or ""})


def format_errors(error: ValidationError) -> list[str]:
    """Pydantic errors as the API server words them: `spec.rollout.waves: <message>`, with list
    indexes in brackets and a rule's fieldPath appended to the location."""
    lines = []
    for e in error.errors(include_url=False):
        path = ""
        for part in e["loc"]:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        path = (path + (e.get("ctx") or {}).get("field_path", "")).lstrip(".")
        lines.append(f"{path}: {e['msg']}" if path else e["msg"])
    return lines


def checked(rule: Rule) -> tuple[Rule, AfterValidator]:
    """Annotated metadata that applies `rule` to a single value (CRD and pydantic alike)."""

    def _validate(value: Any) -> Any:
        if not rule.check(value):
            raise rule_error(rule)
        return value

    return rule, AfterValidator(_validate)


class Model(BaseModel):
    """Base of every API type: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
        validate_assignment=False,
    )
    cel_rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> Model:
        for rule in type(self).cel_rules:
            if not rule.check(self):
                raise rule_error(rule)
        return self

    def to_dict(self) -> dict[str, Any]:
        """The wire form: camelCase keys, JSON types, unset optional fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# ---- strings with the bounds the API server needs (CEL cost estimates need maxLength) ----

SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_QUALIFIED_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"  # at most 63 characters
DNS_SUBDOMAIN = rf"^{SUBDOMAIN}$"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
DNS_1035_LABEL = r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"  # Service names
# a label key (and a taint key, an extended resource name): [DNS subdomain prefix "/"] name
LABEL_KEY = rf"^({SUBDOMAIN}/)?{_QUALIFIED_NAME}$"
LONG_PREFIX = r"^[^/]{254,}/"  # the prefix is a DNS subdomain: at most 253 characters
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
DIGEST = r"^sha256:[a-f0-9]{64}$"
PERCENT = r"^(100|[1-9]?[0-9])%$"
ABSOLUTE_PATH = r"^/[^\x00]*$"


def is_label_key(key: str) -> bool:
    """Kubernetes' rule for label keys: optional DNS subdomain prefix (<= 253) and "/", then a name of
    at most 63 alphanumerics, '-', '_' or '.', starting and ending alphanumeric."""
    return re.fullmatch(LABEL_KEY, key) is not None and re.match(LONG_PREFIX, key) is None


LABEL_KEY_HINT = ("an optional DNS subdomain prefix of at most 253 characters and '/', then a name of at most 63 "
                  "letters, digits, '-', '_' or '.' that starts and ends with a letter or digit, e.g. "
                  "kubernetes.io/arch")


def label_keys_rule(what: str) -> Rule:
    """Keys of a map (matchLabels) must be label keys: CEL cannot put a pattern on map keys, so check them all."""
    return Rule(f"self.all(k, k.matches(r'{LABEL_KEY}') && !k.matches(r'{LONG_PREFIX}'))",
                f"{what}: every key must be a label key: {LABEL_KEY_HINT}",
                lambda m: all(is_label_key(k) for k in m))


LABEL_KEY_RULE = Rule(f"self.matches(r'{LABEL_KEY}') && !self.matches(r'{LONG_PREFIX}')",
                      f"must be a label key: {LABEL_KEY_HINT}", is_label_key)

Name = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)]
LabelKey = Annotated[str, Field(min_length=1, max_length=317), *checked(LABEL_KEY_RULE)]
AnyKey = Annotated[str, Field(min_length=1, max_length=317)]  # a map key; the map's rule checks it
LabelValue = Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]
Digest = Annotated[str, Field(max_length=71, pattern=DIGEST)]
ShortText = Annotated[str, Field(max_length=1024)]
ConditionType = Annotated[str, Field(min_length=1, max_length=316)]
Reason = Annotated[str, Field(max_length=1024)]
Message = Annotated[str, Field(max_length=32768)]


# ---- label selectors ----

class LabelSelectorRequirement(Model):
    """One selector expression: a label key, an operator and, for In and NotIn, the values."""

    key: LabelKey
    """The label key the expression applies to, e.g. `kubernetes.io/arch`."""
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    """How the key relates to the values: In, NotIn, Exists or DoesNotExist."""
    values: Annotated[list[LabelValue], Field(max_length=64)] | None = None
    """The values for In and NotIn (at least one). Must be empty for Exists and DoesNotExist."""

    cel_rules = (
        Rule(
            "self.operator in ['In', 'NotIn'] ? (has(self.values) && size(self.values) > 0)"
            " : (!has(self.values) || size(self.values) == 0)",
            "matchExpressions[].values: operators In and NotIn need at least one value;"
            " Exists and DoesNotExist take no values (remove values)",
            lambda s: bool(s.values) if s.operator in ("In", "NotIn") else not s.values,
            ".values",
        ),
    )


class LabelSelector(Model):
    """A label selector (as metav1.LabelSelector): matchLabels and matchExpressions are ANDed.
    An empty selector matches every object."""

    match_labels: Annotated[
        dict[AnyKey, LabelValue], Field(max_length=64), *checked(label_keys_rule("matchLabels"))
    ] | None = None
    """Labels that must all be present with exactly these values."""
    match_expressions: Annotated[list[LabelSelectorRequirement], Field(max_length=32)] | None = None
    """Expressions that must all hold."""


def label_selector_matches(selector: LabelSelector | dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """Whether `labels` satisfy `selector` (metav1.LabelSelector semantics).

    matchLabels and matchExpressions are ANDed; an empty selector matches everything, and so does
    None (an omitted selector in this API means "no restriction"). NotIn and DoesNotExist match
    objects that lack the key.
    """
    if selector is None:
        return True
    if isinstance(selector, dict):
        selector = LabelSelector.model_validate(selector)
    for key, value in (selector.match_labels or {}).items():
        if labels.get(key) != value:
            return False
    for req in selector.match_expressions or []:
        present = req.key in labels
        if req.operator == "In" and not (present and labels[req.key] in (req.values or [])):
            return False
        if req.operator == "NotIn" and present and labels[req.key] in (req.values or []):
            return False
        if req.operator == "Exists" and not present:
            return False
        if req.operator == "DoesNotExist" and present:
            return False
    return True


# ---- status building blocks ----

class Condition(Model):
    """The state of one aspect of the object (metav1.Condition)."""

    type: ConditionType
    """The condition type in CamelCase, e.g. Ready, Available, Progressing, Degraded."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds: True, False or Unknown."""
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    """The .metadata.generation the condition was computed from."""
    last_transition_time: datetime
    """When the status last changed (RFC 3339)."""
    reason: Annotated[str, Field(min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")]
    """A machine-readable CamelCase reason for the last transition."""
    message: Message = ""
    """A human-readable explanation of the last transition."""


def list_map(*keys: str) -> dict[str, Any]:
    """Schema extras for a list merged by key (x-kubernetes-list-type: map), e.g. conditions by type."""
    return {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": list(keys)}


Conditions = Annotated[list[Condition], Field(max_length=16, json_schema_extra=list_map("type"))]

# Condition types the operator sets.
READY = "Ready"  # EdgeModel: every wanted variant is compiled and stored
AVAILABLE = "Available"  # EdgeDeployment: every class serves the wanted digest on enough nodes
PROGRESSING = "Progressing"
DEGRADED = "Degraded"
COMPILED = "Compiled"  # EdgeModel: the compile of the current generation has finished
DRIFTING = "Drifting"  # EdgeDeployment: the served inputs drift from the reference


def is_percent(value: str) -> bool:
    return re.fullmatch(PERCENT, value) is not None
