"""edgefleet_dev.admin, the cluster admin's side of the tenant rules as the demo, tests and benchmarks play it:
against a fake kubectl that applies JSON patches with their resourceVersion test, as the API server does."""

from __future__ import annotations

import copy
import json
import subprocess

import pytest
from edgefleet.api import builtin_profiles
from edgefleet.render.tenancy import class_refusal
from edgefleet_dev.admin import AdminError, local_data_allowed, trust_with_privileged_classes


class FakeCluster:
    """HardwareProfiles and namespaces behind `kubectl get` and `kubectl patch --type=json` (test and add ops)."""

    def __init__(self, namespaces: set[str], races: int = 0):
        self.profiles = {p.metadata["name"]: {**p.to_dict(), "metadata": {**p.metadata, "resourceVersion": "1"}}
                         for p in builtin_profiles()}
        self.namespaces, self.races, self.patches = namespaces, races, 0

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        if args[:2] == ("get", "namespaces"):
            return self._ok(" ".join(sorted(self.namespaces)))
        if args[:2] == ("get", "hardwareprofiles"):
            return self._ok(json.dumps({"items": list(self.profiles.values())}))
        if args[:2] == ("get", "hardwareprofile"):
            return self._ok(json.dumps(self.profiles[args[2]]))
        assert args[:2] == ("patch", "hardwareprofile") and args[3] == "--type=json", args
        self.patches += 1
        obj = self.profiles[args[2]]
        if self.races:  # someone else writes between our read and our patch
            self.races -= 1
            self._bump(obj)
        ops = json.loads(args[5])
        assert ops[0] == {"op": "test", "path": "/metadata/resourceVersion", "value": ops[0]["value"]}
        if ops[0]["value"] != obj["metadata"]["resourceVersion"]:
            return subprocess.CompletedProcess(args, 1, "", "the server rejected our request: testing value failed")
        for op in ops[1:]:
            assert op["op"] == "add" and op["path"].startswith("/spec/"), op
            obj["spec"][op["path"].removeprefix("/spec/")] = copy.deepcopy(op["value"])
        self._bump(obj)
        return self._ok("patched")

    @staticmethod
    def _bump(obj: dict) -> None:
        obj["metadata"]["resourceVersion"] = str(int(obj["metadata"]["resourceVersion"]) + 1)

    @staticmethod
    def _ok(out: str) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess([], 0, out, "")


def _class(cluster: FakeCluster, name: str):
    from edgefleet.api import HardwareProfile

    return HardwareProfile.model_validate(cluster.profiles[name])


def test_tenant_admin_trusts_a_namespace_with_the_privileged_classes_only():
    cluster = FakeCluster({"t-1", "kube-system"})
    assert class_refusal(_class(cluster, "coral-edgetpu"), "t-1") is not None
    assert trust_with_privileged_classes(cluster, "t-1") == ["coral-edgetpu"]
    assert class_refusal(_class(cluster, "coral-edgetpu"), "t-1") is None
    assert class_refusal(_class(cluster, "coral-edgetpu"), "kube-system") is not None  # only the one namespace
    assert all("allowedNamespaces" not in p["spec"] for n, p in cluster.profiles.items() if n != "coral-edgetpu")
    before = cluster.patches
    trust_with_privileged_classes(cluster, "t-1")  # already trusted: no write
    assert cluster.patches == before


def test_tenant_admin_keeps_live_namespaces_and_drops_gone_ones():
    cluster = FakeCluster({"t-1", "t-2", "t-3"})
    for ns in ("t-1", "t-2"):
        trust_with_privileged_classes(cluster, ns)
    cluster.namespaces.discard("t-1")  # a test namespace deleted since
    trust_with_privileged_classes(cluster, "t-3")
    assert cluster.profiles["coral-edgetpu"]["spec"]["allowedNamespaces"] == ["t-2", "t-3"]


def test_admin_patch_retries_a_lost_race_and_names_the_field_when_it_keeps_losing():
    cluster = FakeCluster({"t-1"}, races=2)
    trust_with_privileged_classes(cluster, "t-1")
    assert cluster.profiles["coral-edgetpu"]["spec"]["allowedNamespaces"] == ["t-1"] and cluster.patches == 3
    stuck = FakeCluster({"t-1"}, races=100)
    with pytest.raises(AdminError, match="coral-edgetpu: patching spec allowedNamespaces failed 5 times; "
                                         "last: .*testing value failed"):
        trust_with_privileged_classes(stuck, "t-1")


def test_tenant_admin_allows_local_data_while_open_and_prunes_gone_namespaces():
    cluster = FakeCluster({"t-1", "t-2"})
    spec = cluster.profiles["cpu-amd64"]["spec"]
    spec["localDataPaths"] = [{"hostPath": "/srv/gone", "namespaces": ["t-gone"]},
                              {"hostPath": "/srv/shared", "namespaces": ["t-2", "t-gone"]}]
    with local_data_allowed(cluster, "cpu-amd64", "/tmp/fl-1", "t-1"):
        assert cluster.profiles["cpu-amd64"]["spec"]["localDataPaths"] == [
            {"hostPath": "/srv/shared", "namespaces": ["t-2"]}, {"hostPath": "/tmp/fl-1", "namespaces": ["t-1"]}]
    assert cluster.profiles["cpu-amd64"]["spec"]["localDataPaths"] == [
        {"hostPath": "/srv/shared", "namespaces": ["t-2"]}]
