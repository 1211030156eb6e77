"""Which hardware class each node belongs to, and the node affinity that says the same to the scheduler.

A node belongs to the highest-priority profile whose selector matches it (ties: the lower name wins).
The workload of a class therefore needs `profile AND fleet AND NOT(each outranking profile)` as node
affinity; negating a conjunction gives a disjunction, so the result is expanded into OR-ed terms and
terms that can never match are dropped.
"""

from __future__ import annotations

from itertools import product
from typing import Any

from ..api import HardwareProfile, LabelSelector, best_profile

MAX_TERMS = 64

Req = tuple[str, str, frozenset[str]]  # (key, operator, values)
_OPPOSITE = {"In": "NotIn", "NotIn": "In", "Exists": "DoesNotExist", "DoesNotExist": "Exists"}


class PlacementError(ValueError):
    """The profiles' selectors cannot be expressed as node affinity; `fix` says what the user can change."""

    def __init__(self, message: str, fix: str):
        super().__init__(f"{message}; {fix}")
        self.message = message
        self.fix = fix


def _rank(profile: HardwareProfile) -> tuple[int, str]:
    """The order `best_profile` picks in: higher priority first, then the lower name."""
    return (-profile.spec.priority, profile.metadata["name"])


def resolve_nodes(nodes: dict[str, dict[str, str]], profiles: list[HardwareProfile]) -> dict[str, str | None]:
    """node name -> winning profile name (`best_profile`), or None when no profile matches."""
    return {name: (p.metadata["name"] if (p := best_profile(profiles, labels)) else None)
            for name, labels in nodes.items()}


def higher_priority(profile: HardwareProfile, profiles: list[HardwareProfile]) -> list[HardwareProfile]:
    return [p for p in profiles if _rank(p) < _rank(profile)]


def requirements(selector: LabelSelector | None) -> list[Req]:
    if selector is None:
        return []
    reqs = [(k, "In", frozenset([v])) for k, v in (selector.match_labels or {}).items()]
    reqs += [(r.key, r.operator, frozenset(r.values or [])) for r in selector.match_expressions or []]
    return reqs


def _feasible(term: list[Req]) -> bool:
    by_key: dict[str, list[Req]] = {}
    for req in term:
        by_key.setdefault(req[0], []).append(req)
    for reqs in by_key.values():
        ops = {op for _, op, _ in reqs}
        if "DoesNotExist" in ops and ops & {"In", "Exists"}:
            return False
        allowed = None
        for _, op, values in reqs:
            if op == "In":
                allowed = values if allowed is None else allowed & values
        if allowed is not None:
            excluded = frozenset().union(*(v for _, op, v in reqs if op == "NotIn"))
            if not allowed - excluded:
                return False
    return True


def _implied(req: Req, others: list[Req]) -> bool:
    """Whether `others` already force `req` to hold."""
    key, op, values = req
    for k, o, v in others:
        if k != key:
            continue
        if op == "NotIn" and ((o == "In" and not v & values) or o == "DoesNotExist"):
            return True
        if (op == "Exists" and o == "In") or (op == "In" and o == "In" and v <= values):
            return True
    return False


def _simplify(term: list[Req]) -> list[Req]:
    out: list[Req] = []
    for req in term:
        if req not in out:
            out.append(req)
    return [r for i, r in enumerate(out) if not _implied(r, out[:i] + out[i + 1:])]


def _absorb(terms: list[list[Req]]) -> list[list[Req]]:
    """Drop terms that are stricter than another term (A or (A and B) == A)."""
    sets = [frozenset(t) for t in terms]
    return [t for i, t in enumerate(terms) if not any(j != i and sets[j] < sets[i] for j in range(len(terms)))]


def node_affinity(include: list[LabelSelector | None], exclude: list[LabelSelector]) -> dict[str, Any] | None:
    """requiredDuringScheduling node affinity for AND(include) AND NOT(each exclude); None if unconstrained."""
    base = [r for sel in include for r in requirements(sel)]
    negations = [[(k, _OPPOSITE[op], v) for k, op, v in requirements(sel)] for sel in exclude]
    if any(not n for n in negations):
        return {"nodeSelectorTerms": []}  # an empty exclude selector matches everything: nothing is left
    terms = []
    for choice in product(*negations):
        term = _simplify(base + list(choice))
        if _feasible(term) and term not in terms:
            terms.append(term)
        if len(terms) > MAX_TERMS:
            raise PlacementError(
                f"the node selectors of this profile and the {len(exclude)} HardwareProfiles that outrank it "
                f"expand to more than {MAX_TERMS} node affinity terms",
                "give overlapping HardwareProfiles distinct priorities or simpler selectors, or narrow "
                "spec.nodeSelector",
            )
    terms = _absorb(terms)
    if terms == [[]]:
        return None
    return {"nodeSelectorTerms": [{"matchExpressions": [_expr(r) for r in t]} for t in terms]}


def _expr(req: Req) -> dict[str, Any]:
    key, op, values = req
    expr: dict[str, Any] = {"key": key, "operator": op}
    if op in ("In", "NotIn"):
        expr["values"] = sorted(values)
    return expr
