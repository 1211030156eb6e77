"""The mutual-TLS material of one FederatedTraining: a CA, a server certificate and a client certificate,
all in memory (PEM bytes) for the Secret the operator manages. ECDSA P-256, valid for `days`."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class TlsBundle:
    ca_cert: bytes
    server_cert: bytes
    server_key: bytes
    client_cert: bytes
    client_key: bytes

    def secret_data(self) -> dict[str, bytes]:
        """Keys of the Secret: the pods mount the ones their side needs."""
        return {"ca.crt": self.ca_cert, "server.crt": self.server_cert, "server.key": self.server_key,
                "client.crt": self.client_cert, "client.key": self.client_key}


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


def make_bundle(name: str, server_names: list[str], days: int = 30) -> TlsBundle:
    """A fresh CA for run `name`, a server certificate for `server_names` and one client certificate."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"edgefleet federated CA {name}")])
    ca = _cert(f"edgefleet federated CA {name}", ca_key, ca_name, ca_key, days, ca=True)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    server = _cert(server_names[0], server_key, ca_name, ca_key, days, dns=server_names,
                   usage=ExtendedKeyUsageOID.SERVER_AUTH)
    client = _cert(f"{name}-client", client_key, ca_name, ca_key, days, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    pem = serialization.Encoding.PEM
    return TlsBundle(ca.public_bytes(pem), server.public_bytes(pem), _pem_key(server_key),
                     client.public_bytes(pem), _pem_key(client_key))
