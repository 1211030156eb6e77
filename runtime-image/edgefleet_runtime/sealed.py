"""Job reports the operator can authenticate: an HMAC-SHA256 envelope bound to the request.

Every Job the operator starts for a model (compile, bench) gets a key of its own, mounted from a Secret in the
operator's namespace into that Job's pod only, and a binding: the Job's name, a pure function of the model's
namespace, name, generation and inputs. The Job pushes its report wrapped as ``{"kind": "SealedReport",
"binding", "report", "mac"}``; the operator derives the same key from its master key and accepts the report only
when the binding is the one it expects and the MAC verifies. A pod that may push to the registry but holds no
key can overwrite the tag; it cannot forge the report, nor replay one made for another request.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os

KEY_FILE_ENV = "EDGEFLEET_REPORT_KEY_FILE"
BINDING_ENV = "EDGEFLEET_REPORT_BINDING"
KIND = "SealedReport"
MIN_KEY_BYTES = 32


class ReportRejected(ValueError):
    """A report that is not sealed, is bound to another request, or whose MAC does not verify."""


def derive(master: bytes, purpose: str) -> bytes:
    """The key for one purpose (``job:<name>``, ``content:<key>``) from the operator's master key."""
    if len(master) < MIN_KEY_BYTES:
        raise ValueError(f"the master key has {len(master)} bytes; at least {MIN_KEY_BYTES} are needed")
    return hmac.new(master, purpose.encode(), hashlib.sha256).digest()


def _mac(key: bytes, binding: str, report: str) -> str:
    return hmac.new(key, f"{binding}\n{report}".encode(), hashlib.sha256).hexdigest()


def seal(key: bytes, binding: str, report: bytes) -> bytes:
    """The envelope of ``report`` (UTF-8 JSON) for ``binding``."""
    if not binding or "\n" in binding:
        raise ValueError("a report binding is one non-empty line")
    text = report.decode()
    return json.dumps({"kind": KIND, "binding": binding, "report": text, "mac": _mac(key, binding, text)}).encode()


def open_sealed(key: bytes, binding: str, envelope: bytes) -> bytes:
    """The report inside ``envelope`` when it is sealed for ``binding`` with ``key``; else ReportRejected."""
    try:
        doc = json.loads(envelope)
    except ValueError as err:
        raise ReportRejected(f"not JSON: {err}") from err
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise ReportRejected("not a sealed report (no SealedReport envelope)")
    got, text, mac = doc.get("binding"), doc.get("report"), doc.get("mac")
    if not (isinstance(got, str) and isinstance(text, str) and isinstance(mac, str)):
        raise ReportRejected("a sealed report needs string binding, report and mac")
    if not hmac.compare_digest(got, binding):
        raise ReportRejected(f"sealed for {got[:80]!r}, not for {binding!r} (a replayed report)")
    if not hmac.compare_digest(mac, _mac(key, binding, text)):
        raise ReportRejected("its MAC does not verify (forged or altered)")
    return text.encode()


def seal_from_env(report: bytes) -> bytes:
    """Sealed with the Job's key and binding (EDGEFLEET_REPORT_KEY_FILE, EDGEFLEET_REPORT_BINDING) when the
    operator gave them; else ``report`` as it is (a CLI run by hand)."""
    path, binding = os.environ.get(KEY_FILE_ENV), os.environ.get(BINDING_ENV)
    if not path or not binding:
        return report
    with open(path) as f:
        key = bytes.fromhex(f.read().strip())  # the Secret holds the key as hex
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"{KEY_FILE_ENV}={path}: the report key has {len(key)} bytes, {MIN_KEY_BYTES} needed")
    return seal(key, binding, report)
