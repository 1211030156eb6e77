"""label_selector_matches: metav1.LabelSelector semantics."""

from __future__ import annotations

import pytest
from edgefleet.api import LabelSelector, label_selector_matches

NODE = {"kubernetes.io/arch": "arm64", "node-role.kubernetes.io/edge": "", "nvidia.com/gpu.present": "true"}


def expr(key, operator, *values):
    e = {"key": key, "operator": operator}
    if values:
        e["values"] = list(values)
    return {"matchExpressions": [e]}


@pytest.mark.parametrize(
    "selector, matches",
    [
        (None, True),
        ({}, True),
        ({"matchLabels": {"kubernetes.io/arch": "arm64"}}, True),
        ({"matchLabels": {"kubernetes.io/arch": "amd64"}}, False),
        ({"matchLabels": {"kubernetes.io/arch": "arm64", "nvidia.com/gpu.present": "true"}}, True),
        ({"matchLabels": {"kubernetes.io/arch": "arm64", "missing": "x"}}, False),
        ({"matchLabels": {"node-role.kubernetes.io/edge": ""}}, True),
        (expr("kubernetes.io/arch", "In", "amd64", "arm64"), True),
        (expr("kubernetes.io/arch", "In", "amd64"), False),
        (expr("missing", "In", "x"), False),
        (expr("kubernetes.io/arch", "NotIn", "amd64"), True),
        (expr("kubernetes.io/arch", "NotIn", "arm64"), False),
        (expr("missing", "NotIn", "x"), True),
        (expr("node-role.kubernetes.io/edge", "Exists"), True),
        (expr("missing", "Exists"), False),
        (expr("missing", "DoesNotExist"), True),
        (expr("kubernetes.io/arch", "DoesNotExist"), False),
        ({"matchLabels": {"kubernetes.io/arch": "arm64"}, **expr("missing", "Exists")}, False),
        ({"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["arm64"]},
                               {"key": "nvidia.com/gpu.present", "operator": "Exists"}]}, True),
    ],
)
def test_matches(selector, matches):
    assert label_selector_matches(selector, NODE) is matches
    if selector is not None:
        assert label_selector_matches(LabelSelector.model_validate(selector), NODE) is matches


def test_empty_labels():
    assert label_selector_matches({}, {})
    assert label_selector_matches(expr("a", "DoesNotExist"), {})
    assert not label_selector_matches(expr("a", "Exists"), {})
