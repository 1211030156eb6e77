"""Cost of signed and encrypted variants, against the unsigned / unencrypted path in the same run.

    python benchmarks/trust.py [--runs 7] [--json benchmarks/results/trust.json] [--big-mib 64]

Per variant (the repository's fixture models, plus a random blob of --big-mib MiB for the byte-bound steps):

- sign: the compiler's added work per published variant: ECDSA P-256 over the sha256 it already computes
  (``hash`` is that sha256, the baseline), and the AES-256-GCM encryption for a public key (ECDH-ES wrap);
- fetch: ``edgefleet_runtime.fetch.fetch`` from a file ref into an empty cache, without a policy (baseline) and
  with ``--public-key --require-signature`` (verified before the rename);
- load: ``ModelSlot.load`` (digest check, open, warm-up) of the plaintext file (baseline) and of the signed,
  encrypted file (digest check, signature check, decryption in memory, open, warm-up).

Median of --runs each (baseline and variant alternate run by run); ratios are against the baseline of the
same run. Fetches write into a fresh cache directory each run (the same filesystem as the source).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from edgefleet_runtime import trust
from edgefleet_runtime.app import Metrics, ModelSlot
from edgefleet_runtime.fetch import fetch

M = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "models"
MODELS = ["digits_cnn.onnx", "tiny_encoder.onnx", "ppocr_det_v4.onnx"]


def median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def paired_ms(baseline, variant, runs: int) -> tuple[float, float]:
    """Medians of ``baseline`` and ``variant`` run alternately, so drifting machine load hits both alike."""
    a, b = [], []
    for _ in range(runs):
        for fn, out in ((baseline, a), (variant, b)):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1000)
    return statistics.median(a), statistics.median(b)


def _write(path: Path, data: bytes, signature: str | None = None) -> tuple[Path, str]:
    path.write_bytes(data)
    if signature:
        Path(trust.signature_path(path)).write_text(signature)
    return path, "sha256:" + hashlib.sha256(data).hexdigest()


def measure(name: str, data: bytes, work: Path, keys: dict, runs: int, load: bool) -> dict:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    row: dict = {"variant": name, "sizeBytes": len(data)}
    row["hash_ms"] = median_ms(lambda: hashlib.sha256(data).digest(), runs)
    row["sign_ms"] = median_ms(lambda: trust.sign_digest(keys["sign"], digest), runs)
    row["encrypt_ms"] = median_ms(lambda: trust.encrypt(data, keys["enc_pub"]), runs)
    encrypted = trust.encrypt(data, keys["enc_pub"])
    enc_digest = "sha256:" + hashlib.sha256(encrypted).hexdigest()
    sig = trust.sign_digest(keys["sign"], enc_digest)
    row["verify_ms"] = median_ms(lambda: keys["policy"].check(enc_digest, sig, name), runs)
    plain_src, _ = _write(work / f"{name}.plain", data)
    enc_src, _ = _write(work / f"{name}.enc", encrypted, sig)

    def fetch_into(src, want, policy):
        def run():
            cache = Path(tempfile.mkdtemp(dir=work))
            fetch(src.as_uri(), want, cache, policy=policy)
        return run

    row["fetch_ms"], row["fetch_verified_ms"] = paired_ms(
        fetch_into(plain_src, digest, None), fetch_into(enc_src, enc_digest, keys["policy"]), runs
    )
    if load:
        plain_slot = ModelSlot(name, Metrics(), threads=1)
        enc_slot = ModelSlot(name, Metrics(), threads=1, policy=keys["policy"])
        row["load_ms"], row["load_decrypt_ms"] = paired_ms(
            lambda: plain_slot.load(str(plain_src), digest), lambda: enc_slot.load(str(enc_src), enc_digest), runs
        )
    return row


def _keys(work: Path) -> dict:
    sign_private, sign_public = trust.generate_signing_key()
    enc_private, enc_public = trust.generate_signing_key()
    for name, data in [("sign.key", sign_private), ("sign.pub", sign_public), ("enc.key", enc_private),
                       ("enc.pub", enc_public)]:
        (work / name).write_bytes(data)
    return {
        "sign": trust.load_signing_key(work / "sign.key"),
        "enc_pub": trust.load_encryption_key(work / "enc.pub"),
        "policy": trust.Policy.from_files([work / "sign.pub"], True, work / "enc.key"),
    }


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--big-mib", type=int, default=64, help="size of the random blob (sign/fetch only; 0: none)")
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/trust.json"))
    args = ap.parse_args()
    logging.disable(logging.INFO)
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgefleet-trust-bench-") as tmp:
        work = Path(tmp)
        keys = _keys(work)
        for model in MODELS:
            rows.append(measure(model, (M / model).read_bytes(), work, keys, args.runs, load=True))
        if args.big_mib:
            blob = os.urandom(args.big_mib << 20)
            rows.append(measure(f"random-{args.big_mib}MiB", blob, work, keys, args.runs, load=False))
    head = ["variant", "MiB", "hash ms", "+sign ms", "encrypt ms", "verify ms", "fetch ms", "fetch+verify ms",
            "ratio", "load ms", "load+verify+decrypt ms", "ratio"]
    table = [head]
    for r in rows:
        table.append([
            r["variant"], f"{r['sizeBytes'] / 2**20:.2f}", f"{r['hash_ms']:.2f}", f"{r['sign_ms']:.3f}",
            f"{r['encrypt_ms']:.2f}", f"{r['verify_ms']:.3f}", f"{r['fetch_ms']:.2f}", f"{r['fetch_verified_ms']:.2f}",
            _ratio(r["fetch_verified_ms"], r["fetch_ms"]),
            f"{r['load_ms']:.1f}" if "load_ms" in r else "-",
            f"{r['load_decrypt_ms']:.1f}" if "load_ms" in r else "-",
            _ratio(r["load_decrypt_ms"], r["load_ms"]) if "load_ms" in r else "-",
        ])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"runs": args.runs, "python": sys.version.split()[0], "rows": rows}, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
