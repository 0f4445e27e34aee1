"""Trust tokens in Incus's encoding (base64 of a JSON CertificateAddToken), so Incus clients accept ours."""

from __future__ import annotations

import base64
import binascii
import json
import time
from typing import Any


def encode_token(client_name: str, fingerprint: str, addresses: list[str], secret: str, expires_at: float) -> str:
    expiry = (
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires_at)) if expires_at else "0001-01-01T00:00:00Z"
    )
    body = {"client_name": client_name, "fingerprint": fingerprint, "addresses": addresses, "secret": secret,
            "expires_at": expiry}
    return base64.b64encode(json.dumps(body).encode()).decode()


def decode_token(token: str) -> dict[str, Any]:
    try:
        body = json.loads(base64.b64decode(token.strip(), validate=True))
    except (ValueError, binascii.Error, json.JSONDecodeError, RecursionError):  # "[[[[..." from a stranger
        raise ValueError("this is not a trust token: it should be the text 'config trust add' printed") from None
    if not isinstance(body, dict) or "secret" not in body or "fingerprint" not in body:
        raise ValueError("this is not a trust token: it lacks the secret or the server fingerprint")
    return body
