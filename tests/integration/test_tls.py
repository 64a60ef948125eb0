"""mTLS on the tail service's port: a device with a client certificate gets answers, one without
does not get in. Certificates are made here with `cryptography` (a throwaway CA)."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgecut.edge.agent import image_input
from edgecut.edge.startup import EdgeConfig, start_agent
from edgecut.errors import UnavailableError
from edgecut.images import sample_photos
from edgecut.keys import KeyPaths


def _cert(
    name: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, Any] | None, ca: bool = False
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer or (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("edgecut test CA", ca_key, None, ca=True)
    _write(d / "ca", ca_key, ca)
    for name in ("server", "device"):
        key = ec.generate_private_key(ec.SECP256R1())
        _write(d / name, key, _cert(name, key, (ca.subject, ca_key)))
    return d


def test_mtls(effl0_bundle: Path, keys: KeyPaths, tail_server: Any, pki: Path) -> None:
    photo = sample_photos()[0]
    with tail_server(
        tls_cert=pki / "server.crt", tls_key=pki / "server.key", client_ca=pki / "ca.crt"
    ) as server:
        base = EdgeConfig(
            effl0_bundle,
            f"127.0.0.1:{server.port}",
            keys.service_pub,
            cut="c03",
            fallback="fail",
            tls_ca=pki / "ca.crt",
        )
        good = EdgeConfig(**{**base.__dict__, "tls_cert": pki / "device.crt", "tls_key": pki / "device.key"})
        results: list[Any] = []
        with start_agent(good) as agent:
            agent.run([image_input(0, *photo)], results.append)
        assert [r.where for r in results] == ["cloud"]
        with pytest.raises(UnavailableError), start_agent(base) as agent:
            agent.run([image_input(0, *photo)], results.append)
        plain = EdgeConfig(**{**base.__dict__, "tls_ca": None})
        with pytest.raises(UnavailableError), start_agent(plain) as agent:
            agent.run([image_input(0, *photo)], results.append)
