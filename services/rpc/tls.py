"""Mutual TLS for every gRPC server and channel of the platform, from one directory: `ca.crt`, `tls.crt`,
`tls.key` (the layout of a Kubernetes TLS Secret as cert-manager writes it).

Off unless a directory is given: `--tls-dir DIR` on a service (or `EXPERTMESH_TLS_DIR`, which `expertmesh up`
sets for its children). With it, servers require a client certificate signed by the CA (a peer without one is
refused during the handshake), and channels present the process's own certificate and trust only the CA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import grpc

from services.errors import ConfigError

TLS_DIR_ENV = "EXPERTMESH_TLS_DIR"
FILES = ("ca.crt", "tls.crt", "tls.key")


@dataclass(frozen=True)
class TlsFiles:
    ca: bytes
    cert: bytes
    key: bytes


def configure(tls_dir: str | Path | None) -> None:
    """Use `tls_dir` for every server and channel of this process (None: keep $EXPERTMESH_TLS_DIR or plain text)."""
    _files.cache_clear()
    if tls_dir:
        _files(str(tls_dir))  # a missing or unreadable file is an error now (and the setting is left as it was)
        os.environ[TLS_DIR_ENV] = str(tls_dir)
    tls_files()


def tls_files() -> TlsFiles | None:
    return _files(os.environ.get(TLS_DIR_ENV) or None)


@cache
def _files(tls_dir: str | None) -> TlsFiles | None:
    if not tls_dir:
        return None
    blobs = []
    for name in FILES:
        path = Path(tls_dir) / name
        try:
            blobs.append(path.read_bytes())
        except OSError as exc:
            raise ConfigError("--tls-dir", f"cannot read {path}: {exc.strerror or exc}") from None
        if not blobs[-1].strip():
            raise ConfigError("--tls-dir", f"{path} is empty")
    return TlsFiles(*blobs)


def add_port(server, address: str) -> int:
    """Bind `server` (sync or aio) to `address`, with mutual TLS when configured."""
    files = tls_files()
    if files is None:
        return server.add_insecure_port(address)
    credentials = grpc.ssl_server_credentials(
        [(files.key, files.cert)], root_certificates=files.ca, require_client_auth=True
    )
    return server.add_secure_port(address, credentials)


def _credentials() -> grpc.ChannelCredentials | None:
    files = tls_files()
    if files is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=files.ca, private_key=files.key, certificate_chain=files.cert)


def channel(address: str, options: list | None = None) -> grpc.Channel:
    """A blocking channel to `address`, with this process's certificate when TLS is configured."""
    credentials = _credentials()
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, credentials, options=options)


def aio_channel(address: str, options: list | None = None) -> grpc.aio.Channel:
    credentials = _credentials()
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, credentials, options=options)
