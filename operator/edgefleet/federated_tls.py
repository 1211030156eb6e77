"""The mutual-TLS material of one FederatedTraining: a CA, a server certificate and one certificate per
client (its common name is the client's name, its DNS name the node's), all in memory (PEM bytes) for the
Secrets the operator creates: one for the server, one per client, so that no pod holds another's key.
ECDSA P-256, valid for `days`. The CA's key is never kept: once the bundle is made, no one can sign a new
client for the run, so the clients it names are all the run admits."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class KeyPair:
    cert: bytes
    key: bytes

    def secret_data(self, ca_cert: bytes, side: str) -> dict[str, bytes]:
        """The keys of this side's Secret: `ca.crt`, `<side>.crt`, `<side>.key` (the names the pods read)."""
        return {"ca.crt": ca_cert, f"{side}.crt": self.cert, f"{side}.key": self.key}


@dataclass(frozen=True)
class TlsBundle:
    ca_cert: bytes
    server: KeyPair
    clients: dict[str, KeyPair]  # client name (its certificate's common name) -> its pair

    def server_secret_data(self) -> dict[str, bytes]:
        return self.server.secret_data(self.ca_cert, "server")

    def client_secret_data(self, client: str) -> dict[str, bytes]:
        return self.clients[client].secret_data(self.ca_cert, "client")


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key, issuer: x509.Name, issuer_key, days: int, *, ca: bool = False,
          dns: list[str] | None = None, usage=None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                                          key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
    if dns:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False)
    if usage:
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def make_bundle(name: str, server_names: list[str], clients: dict[str, str], days: int = 30) -> TlsBundle:
    """A fresh CA for run `name`, a server certificate for `server_names` and one certificate per client
    (`clients`: its name, at most 64 characters, -> its node, a DNS name)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_subject = f"edgefleet federated CA {name}"[:64]
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_subject)])
    ca = _cert(ca_subject, ca_key, ca_name, ca_key, days, ca=True)
    pem = serialization.Encoding.PEM

    def pair(subject: str, dns: list[str], usage) -> KeyPair:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(subject, key, ca_name, ca_key, days, dns=dns, usage=usage)
        return KeyPair(cert.public_bytes(pem), _pem_key(key))

    server = pair(server_names[0], server_names, ExtendedKeyUsageOID.SERVER_AUTH)
    return TlsBundle(ca.public_bytes(pem), server,
                     {c: pair(c, [node], ExtendedKeyUsageOID.CLIENT_AUTH) for c, node in clients.items()})
