"""How a connection proves who it is, and checks whom it talks to: the credentials (a JWT
``.creds`` file or an nkey seed) and TLS files, turned into nats-py's ``connect`` arguments,
for the gateway and the command-line tools alike. Files that cannot be read are a
:class:`~bus_guard.errors.ConfigError` here, before anything connects (nats-py would call
them a failed connection)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from bus_guard.errors import ConfigError

__all__ = ("auth_kwargs", "tls_context")


def tls_context(cert: str | None, key: str | None, ca: str | None) -> ssl.SSLContext | None:
    """A client TLS context from the certificate, its key and the CA file (``None`` when
    none is given)."""
    if cert is None and key is None and ca is None:
        return None
    if (cert is None) != (key is None):
        raise ConfigError("--tls-cert and --tls-key go together (a client certificate and its key)")
    for path in (ca, cert, key):
        if path is not None:
            _check_readable(path, "TLS")
    try:
        context = ssl.create_default_context(cafile=ca)
        if cert is not None and key is not None:
            context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{cert or ca}: not usable for TLS: {exc}") from None
    return context


def auth_kwargs(
    *,
    creds: str | None = None,
    nkey: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_ca: str | None = None,
) -> dict[str, Any]:
    """nats-py ``connect`` keyword arguments for these files (only those given)."""
    kw: dict[str, Any] = {}
    if creds is not None:
        _check_readable(creds, "credentials")
        kw["user_credentials"] = creds
    if nkey is not None:
        _check_readable(nkey, "nkey seed")
        kw["nkeys_seed"] = nkey
    context = tls_context(tls_cert, tls_key, tls_ca)
    if context is not None:
        kw["tls"] = context
    return kw


def _check_readable(path: str, what: str) -> None:
    try:
        with Path(path).open("rb") as f:
            f.read(1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what} file: {exc.strerror}") from None
