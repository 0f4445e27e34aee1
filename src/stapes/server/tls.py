"""Server TLS context that asks every client for a certificate and lets the trust store decide.

Incus clients present self-signed certificates: no CA can vouch for them, the server's trust store does,
by fingerprint. Python's `ssl` module has no verify callback, and with `CERT_OPTIONAL` alone OpenSSL would
abort the handshake of any client whose certificate is not yet trusted, including the one about to present
a trust token. So we install a verify callback on the underlying `SSL_CTX` that accepts any certificate,
and the HTTP layer checks the fingerprint of what was presented (see auth.py).
"""

from __future__ import annotations

import ctypes
import ssl
import sys
from pathlib import Path

_VERIFY_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)


def _accept(preverify_ok: int, store_ctx: int) -> int:
    return 1


_accept_any_certificate = _VERIFY_CALLBACK(_accept)


def _libssl() -> ctypes.CDLL:
    import _ssl  # the extension module, linked against the libssl OpenSSL uses here

    return ctypes.CDLL(_ssl.__file__)


def _ssl_ctx_pointer(context: ssl.SSLContext) -> int:
    """The SSL_CTX* is the first field after the object header of CPython's PySSLContext."""
    header = sys.getsizeof(object())
    pointer = ctypes.c_void_p.from_address(id(context) + header).value
    if not pointer:
        raise RuntimeError("could not find the SSL_CTX of an ssl.SSLContext")
    return pointer


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    context.verify_mode = ssl.CERT_OPTIONAL
    libssl = _libssl()
    set_verify = libssl.SSL_CTX_set_verify
    set_verify.argtypes = [ctypes.c_void_p, ctypes.c_int, _VERIFY_CALLBACK]
    set_verify.restype = None
    ssl_verify_peer = 0x01
    set_verify(_ssl_ctx_pointer(context), ssl_verify_peer, _accept_any_certificate)
    return context
