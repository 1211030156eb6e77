"""``edgefleet keygen / sign / verify`` and the compiler signing (and encrypting) what it publishes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from edgefleet.cli import main
from edgefleet_runtime import trust

DIGITS = Path(__file__).resolve().parent.parent / "fixtures" / "models" / "digits_cnn.onnx"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def keys(tmp_path):
    assert cli("keygen", "signing", tmp_path / "team").exit_code == 0
    assert cli("keygen", "signing", tmp_path / "other").exit_code == 0
    assert cli("keygen", "encryption", tmp_path / "kek").exit_code == 0
    return tmp_path


def test_keygen_writes_private_keys_0600_and_never_overwrites(keys):
    assert oct((keys / "team.key").stat().st_mode & 0o777) == "0o600"
    assert oct((keys / "kek.key").stat().st_mode & 0o777) == "0o600"
    pub, priv = trust.load_encryption_key(keys / "kek.pub"), trust.load_decryption_key(keys / "kek.key")
    assert trust.decrypt(trust.encrypt(b"x", pub), priv) == b"x"
    before = (keys / "team.key").read_bytes()
    res = cli("keygen", "signing", keys / "team")
    assert res.exit_code == 2 and "not overwriting" in res.output
    assert (keys / "team.key").read_bytes() == before


def test_sign_then_verify_a_file_and_refuse_other_keys_and_tampering(keys, tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(DIGITS.read_bytes())
    res = cli("sign", model, "--key", keys / "team.key")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "model.onnx.sig").exists()
    res = cli("verify", model, "--public-key", keys / "team.pub")
    assert res.exit_code == 0 and "signed by sha256:" in res.output, res.output
    res = cli("verify", model, "--public-key", keys / "other.pub")
    assert res.exit_code == 1 and "BadSignature" in res.output and "fix:" in res.output
    # any of several keys
    assert cli("verify", model, "--public-key", keys / "other.pub", "--public-key", keys / "team.pub").exit_code == 0
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 1
    model.write_bytes(bytes(data))
    res = cli("verify", model, "--public-key", keys / "team.pub")
    assert res.exit_code == 1 and "BadSignature" in res.output


def test_verify_an_unsigned_file_says_unsigned(keys, tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"abc")
    res = cli("verify", model, "--public-key", keys / "team.pub")
    assert res.exit_code == 1 and "Unsigned" in res.output
    res = cli("verify", model, "--public-key", keys / "team.pub", "--signature", tmp_path / "none.sig")
    assert res.exit_code == 2 and "no such file" in res.output
    res = cli("sign", model, "--key", keys / "team.pub")
    assert res.exit_code == 2 and "not an unencrypted PEM private key" in res.output


def _compile(tmp_path, out, *extra):
    from edgefleet.compiler.cli import compile_command

    res = CliRunner().invoke(compile_command, [str(DIGITS), "--profile", "cpu-amd64", "--quantization", "none",
                                               "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
                                               "--timing-runs", "2", "--quiet", *map(str, extra)])
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if x.startswith("cpu-amd64\tReady"))
    return line.split("\t")[3]


def test_compiler_signs_every_variant_it_publishes_beside_the_blob(keys, tmp_path):
    digest = _compile(tmp_path, tmp_path / "store", "--signing-key-file", keys / "team.key")
    blob = tmp_path / "store" / "sha256" / digest.split(":")[1]
    res = cli("verify", blob, "--public-key", keys / "team.pub", "--digest", digest)
    assert res.exit_code == 0, res.output
    # a recompile (cache hit) publishes the same digest and signature: no rollout for nothing
    sig = blob.with_name(blob.name + ".sig").read_text()
    assert _compile(tmp_path, tmp_path / "store", "--signing-key-file", keys / "team.key") == digest
    assert blob.with_name(blob.name + ".sig").read_text() == sig


def test_compiler_refuses_a_bad_signing_key_before_publishing(keys, tmp_path):
    from edgefleet.compiler.cli import compile_command

    res = CliRunner().invoke(compile_command, [str(DIGITS), "--profile", "cpu-amd64", "--out", str(tmp_path / "s"),
                                               "--signing-key-file", str(keys / "team.pub"), "--quiet"])
    assert res.exit_code == 2 and "InvalidSigningKey" in res.output and "fix:" in res.output
    assert not (tmp_path / "s" / "sha256").exists()


def test_compiler_encrypts_so_the_store_holds_no_plaintext(keys, tmp_path):
    plain = _compile(tmp_path, tmp_path / "plain")
    plain_bytes = (tmp_path / "plain" / "sha256" / plain.split(":")[1]).read_bytes()
    digest = _compile(tmp_path, tmp_path / "store", "--signing-key-file", keys / "team.key",
                      "--encryption-key-file", keys / "kek.pub")
    assert digest != plain
    blob = tmp_path / "store" / "sha256" / digest.split(":")[1]
    stored = blob.read_bytes()
    assert "sha256:" + hashlib.sha256(stored).hexdigest() == digest
    assert trust.is_encrypted(stored) and plain_bytes[:256] not in stored and plain_bytes[-256:] not in stored
    assert trust.decrypt(stored, trust.load_decryption_key(keys / "kek.key")) == plain_bytes
    meta = json.loads(blob.with_name(blob.name + ".json").read_text())
    assert meta["annotations"]["io.edgefleet.encryption"] == "A256GCM"
    assert cli("verify", blob, "--public-key", keys / "team.pub").exit_code == 0  # the ciphertext is what is signed
    # same key: same ciphertext (no rollout); a new key (rotation) encrypts again
    assert _compile(tmp_path, tmp_path / "store", "--encryption-key-file", keys / "kek.pub") == digest
    assert cli("keygen", "encryption", keys / "kek2").exit_code == 0
    rotated = _compile(tmp_path, tmp_path / "store", "--encryption-key-file", keys / "kek2.pub")
    assert rotated not in (digest, plain)
    # a 32-byte symmetric key works too
    (keys / "sym").write_bytes(os.urandom(32))
    assert _compile(tmp_path, tmp_path / "store", "--encryption-key-file", keys / "sym") not in (digest, rotated)


def test_sign_encrypt_for_a_public_key_signs_the_ciphertext(keys, tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(DIGITS.read_bytes())
    res = cli("sign", model, "--key", keys / "team.key", "--encrypt-for", keys / "kek.pub")
    assert res.exit_code == 0, res.output
    enc = tmp_path / "model.onnx.enc"
    stored = enc.read_bytes()
    assert trust.is_encrypted(stored) and DIGITS.read_bytes()[:256] not in stored
    assert trust.decrypt(stored, trust.load_decryption_key(keys / "kek.key")) == DIGITS.read_bytes()
    assert cli("verify", enc, "--public-key", keys / "team.pub").exit_code == 0
    res = cli("sign", model, "--key", keys / "team.key", "--encrypt-for", keys / "team.key")
    assert res.exit_code == 2 and "is a private key; encrypt for its public half" in res.output
