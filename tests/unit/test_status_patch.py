"""Status patches go through the kinds' typed status models: only the fields given, checked by the model."""

from __future__ import annotations

import pytest
from edgefleet.reconcile.conditions import READY, set_condition, status_patch
from pydantic import ValidationError


def test_only_the_given_fields_in_wire_form():
    conds = set_condition([], READY, True, "Accepted", "2 nodes", 4)
    patch = status_patch("HardwareProfile", observed_generation=4, matched_nodes=2, conditions=conds)
    assert patch == {"observedGeneration": 4, "matchedNodes": 2, "conditions": conds}
    # a merge patch of one field leaves the others alone: no defaults are filled in
    assert status_patch("EdgeDeployment", nodes_ready="1/2") == {"nodesReady": "1/2"}


def test_a_field_or_value_the_model_refuses_fails_before_the_api_server():
    with pytest.raises(ValidationError, match="matchedNodez"):
        status_patch("HardwareProfile", matchedNodez=2)
    with pytest.raises(ValidationError, match="state"):
        status_patch("EdgeModel", variants=[{"profile": "cpu-amd64", "state": "Done"}])
    with pytest.raises(ValidationError, match="reason"):
        status_patch("EdgeModel", conditions=set_condition([], READY, False, "not camel case", "x", 1))
