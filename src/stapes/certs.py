"""Self-signed certificates for servers and clients, and their fingerprints (SHA-256 of the DER, as Incus)."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def generate_certificate(
    cert_path: Path, key_path: Path, *, server: bool, dns_names: list[str] | None = None,
    ip_addresses: list[str] | None = None,
) -> None:
    """ECDSA P-384, ten years, written with the key readable by its owner only."""
    key = ec.generate_private_key(ec.SECP384R1())
    user = "root" if os.geteuid() == 0 else str(os.geteuid())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Stapes"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"{user}@{socket.gethostname()}"),
    ])
    now = datetime.datetime.now(datetime.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names or []]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses or []]
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(key, hashes.SHA384())
    cert_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key_bytes)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def ensure_certificate(cert_path: Path, key_path: Path, *, server: bool) -> None:
    if not (cert_path.exists() and key_path.exists()):
        generate_certificate(cert_path, key_path, server=server, dns_names=[socket.gethostname()])


def fingerprint_der(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def pem_to_der(pem: str) -> bytes:
    return x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)


def der_to_pem(der: bytes) -> str:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode()


def fingerprint_pem(pem: str) -> str:
    return fingerprint_der(pem_to_der(pem))


def client_ssl_context(client_cert: Path, client_key: Path, server_cert_pem: str | None) -> ssl.SSLContext:
    """Present our certificate; trust exactly the pinned server certificate (no CA, no hostname)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    if server_cert_pem is None:
        context.verify_mode = ssl.CERT_NONE
    else:
        context.load_verify_locations(cadata=server_cert_pem)
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    if client_cert.exists():
        context.load_cert_chain(client_cert, client_key)
    return context
