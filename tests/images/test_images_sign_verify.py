"""Image signatures in cosign's format: `edgefleet images build --push --sign-key` signs each pushed image,
`edgefleet images verify` accepts them and refuses unsigned, wrongly signed and re-pointed signatures.
The signature itself is checked with openssl (independent of our code), and with cosign where installed."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import can_build  # tests/images/conftest.py (imported at collection, as test_images_build does)
from edgefleet_dev.images import build, oci, signing
from edgefleet_dev.images.spec import VERSION


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from edgefleet.cli import main; main()", *args],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)


@pytest.fixture(scope="module")
def pause_built():
    reason = can_build()
    if reason:
        pytest.skip(reason)
    build.build(["pause"], None, echo=print)
    return build.read_index()["pause"]["digest"]


@pytest.fixture
def keys(tmp_path):
    for name in ("team", "other"):
        assert cli("keygen", "signing", str(tmp_path / name)).returncode == 0
    return tmp_path


@pytest.fixture
def target(tmp_path):
    with oci.local_registry(tmp_path / "target") as reg:
        yield reg


def test_images_build_sign_key_signs_each_pushed_image_in_cosign_format(pause_built, keys, target):
    out = cli("images", "build", "--only", "pause", "--push", f"{target}/ef", "--insecure")
    assert out.returncode == 0, out.stderr
    ref = f"{target}/ef/pause@{pause_built}"
    unsigned = cli("images", "verify", ref, "--public-key", str(keys / "team.pub"), "--insecure")
    assert unsigned.returncode == 1 and "Unsigned" in unsigned.stderr, unsigned.stderr

    out = cli("images", "build", "--only", "pause", "--push", f"{target}/ef", "--insecure",
              env={"EDGEFLEET_IMAGE_SIGNING_KEY_FILE": str(keys / "team.key")})
    assert out.returncode == 0, out.stderr
    assert f"sha256-{pause_built.split(':')[1]}.sig" in out.stderr

    # cosign's layout: a manifest at sha256-<hex>.sig whose layer is the simple-signing payload
    sig_manifest = oci.manifest(f"{target}/ef/pause:{pause_built.replace(':', '-')}.sig")
    [layer] = sig_manifest["layers"]
    assert layer["mediaType"] == "application/vnd.dev.cosign.simplesigning.v1+json"
    body = signing.Registry(target, True).blob("ef/pause", layer["digest"], 1 << 16)
    claim = json.loads(body)["critical"]
    assert claim == {"identity": {"docker-reference": f"{target}/ef/pause"},
                     "image": {"docker-manifest-digest": pause_built}, "type": "cosign container image signature"}
    _openssl_verifies(keys / "team.pub", body, layer["annotations"]["dev.cosignproject.cosign/signature"], keys)

    by_tag = cli("images", "verify", f"{target}/ef/pause:{VERSION}", "--public-key", str(keys / "team.pub"),
                 "--insecure")
    assert by_tag.returncode == 0, by_tag.stderr
    assert f"verified {ref}" in by_tag.stdout


def _openssl_verifies(pub, body: bytes, signature_b64: str, tmp) -> None:
    if shutil.which("openssl") is None:
        return
    (tmp / "payload").write_bytes(body)
    (tmp / "payload.sig").write_bytes(base64.b64decode(signature_b64))
    out = subprocess.run(["openssl", "dgst", "-sha256", "-verify", str(pub), "-signature", str(tmp / "payload.sig"),
                          str(tmp / "payload")], capture_output=True, text=True)
    assert out.returncode == 0 and "Verified OK" in out.stdout, out.stdout + out.stderr


def test_images_verify_refuses_a_wrong_key_and_a_signature_moved_to_another_image(pause_built, keys, target):
    build.push(["pause"], f"{target}/ef", insecure=True, echo=print)
    ref = f"{target}/ef/pause@{pause_built}"
    assert cli("images", "sign", ref, "--key", str(keys / "other.key"), "--insecure").returncode == 0
    wrong = cli("images", "verify", ref, "--public-key", str(keys / "team.pub"), "--insecure")
    assert wrong.returncode == 1 and "BadSignature" in wrong.stderr and "fix:" in wrong.stderr, wrong.stderr

    # a second key's signature is added beside the first, as cosign does; the same key again replaces its own
    for _ in range(2):
        assert cli("images", "sign", ref, "--key", str(keys / "team.key"), "--insecure").returncode == 0
    assert len(oci.manifest(f"{target}/ef/pause:{pause_built.replace(':', '-')}.sig")["layers"]) == 2
    ok = cli("images", "verify", ref, "--public-key", str(keys / "team.pub"), "--public-key",
             str(keys / "other.pub"), "--insecure")
    assert ok.returncode == 0, ok.stderr

    # the valid signature manifest copied under another image's .sig tag vouches for the old digest only
    other = "sha256:" + hashlib.sha256(b"another image").hexdigest()
    reg = signing.Registry(target, True)
    manifest, _, _ = reg.manifest("ef/pause", pause_built.replace(":", "-") + ".sig")
    fake = signing.ImageRef(target, "ef/pause", other)
    reg.put_manifest("ef/pause", fake.signature_tag, manifest)
    with pytest.raises(signing.ImageTrustError, match=f"is for {pause_built}, not {other}"):
        signing.verify(fake, _keys(keys), insecure=True)


def _keys(folder):
    from edgefleet_runtime.trust import load_public_keys

    return load_public_keys([folder / "team.pub"])


def test_images_sign_names_a_missing_image_and_a_bad_key(keys, target, tmp_path):
    missing = cli("images", "sign", f"{target}/ef/nothing@sha256:{'0' * 64}", "--key", str(keys / "team.key"),
                  "--insecure")
    assert missing.returncode == 1 and "does not exist" in missing.stderr, missing.stderr
    (tmp_path / "bad.key").write_text("not a key")
    bad = cli("images", "sign", f"{target}/ef/nothing@sha256:{'0' * 64}", "--key", str(tmp_path / "bad.key"))
    assert bad.returncode == 2 and "--key" in bad.stderr, bad.stderr


def cosign() -> str | None:
    return shutil.which("cosign") or os.environ.get("EDGEFLEET_COSIGN")


@pytest.mark.skipif(cosign() is None, reason="cosign is not installed (set EDGEFLEET_COSIGN to its path)")
def test_images_signed_here_verify_with_cosign_and_cosign_signatures_verify_here(pause_built, keys, target):
    build.push(["pause"], f"{target}/ef", insecure=True, echo=print)
    ref = f"{target}/ef/pause@{pause_built}"
    assert cli("images", "sign", ref, "--key", str(keys / "team.key"), "--insecure").returncode == 0
    out = subprocess.run([cosign(), "verify", "--key", str(keys / "team.pub"), "--insecure-ignore-tlog",
                          "--allow-insecure-registry", "--allow-http-registry", ref], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    # cosign signing with an imported PEM key, then our verify
    env = {**os.environ, "COSIGN_PASSWORD": "pw"}
    subprocess.run([cosign(), "import-key-pair", "--key", str(keys / "other.key"), "--output-key-prefix",
                    str(keys / "imported")], capture_output=True, text=True, env=env, check=True, timeout=60)
    signed = subprocess.run([cosign(), "sign", "--key", str(keys / "imported.key"), "--tlog-upload=false", "--yes",
                             "--allow-insecure-registry", "--allow-http-registry", ref], capture_output=True,
                            text=True, env=env, timeout=120)
    assert signed.returncode == 0, signed.stderr
    ours = cli("images", "verify", ref, "--public-key", str(keys / "other.pub"), "--insecure")
    assert ours.returncode == 0, ours.stderr
