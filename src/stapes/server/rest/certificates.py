"""/1.0/certificates: the trust store, and trust tokens (Incus's token flow, so Incus clients can join)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from stapes.api.errors import BadRequest, Conflict, Forbidden, NotFound, PreconditionFailed
from stapes.api.names import validate_entity_name
from stapes.api.requests import CertificatesPost
from stapes.api.status import StatusCode
from stapes.api.tokens import decode_token, encode_token
from stapes.certs import fingerprint_pem
from stapes.server.rest.common import async_operation, body, caller, daemon, recursion, sync
from stapes.server.store.db import CertificateRow


def render(row: CertificateRow) -> dict[str, Any]:
    return {"fingerprint": row.fingerprint, "name": row.name, "type": row.type, "certificate": row.certificate,
            "restricted": row.restricted, "projects": row.projects, "description": ""}


def routes(r: web.RouteTableDef) -> None:
    @r.get("/1.0/certificates")
    async def list_certificates(request: web.Request) -> web.Response:
        rows = daemon(request).trust.certificates()
        if recursion(request):
            return sync([render(row) for row in rows])
        return sync([f"/1.0/certificates/{row.fingerprint}" for row in rows])

    @r.post("/1.0/certificates")
    async def add_certificate(request: web.Request) -> web.Response:
        d = daemon(request)
        who = caller(request)
        data = await body(request, CertificatesPost)
        if data.type not in ("", "client"):  # the Incus client sends an empty type
            raise BadRequest(f"Certificate type {data.type!r} is not supported: Stapes trusts 'client' certificates")
        if data.restricted or data.projects:
            raise BadRequest("Restricted certificates (limited to some projects) are not supported yet: "
                             "add the client unrestricted, or not at all")
        if data.token:
            if not who.trusted:
                raise Forbidden("Only a trusted client can create trust tokens")
            validate_entity_name("client", data.name)
            return await _create_token(request, data.name)
        name = data.name
        secret = data.trust_token or data.password
        if not who.trusted:
            if not secret:
                raise Forbidden("Not trusted: present a trust token (stapes remote add NAME URL --token TOKEN)")
            if who.certificate_pem is None:
                raise Forbidden("Adding a client with a trust token needs a TLS client certificate")
            # One atomic step: of two requests with the same token, exactly one gets it. What the new
            # certificate may do comes from the token, never from the spender's request.
            token = await d.trust.spend_token(_token_secret(secret))
            name = token.name
            pem = who.certificate_pem
            _finish_token_operation(request, token.operation)
        else:
            pem = data.certificate or who.certificate_pem or ""
            if not pem:
                raise BadRequest("Give the client's certificate in 'certificate' (PEM)")
            if name:
                validate_entity_name("client", name)
        try:
            fingerprint = fingerprint_pem(pem)
        except ValueError:
            raise BadRequest("The certificate is not a valid PEM X.509 certificate") from None
        if d.trust.is_trusted(fingerprint):
            raise Conflict("This certificate is already trusted")
        await d.trust.add(CertificateRow(fingerprint, name or fingerprint[:12], "client", pem, False, []))
        headers = {"Location": f"/1.0/certificates/{fingerprint}"}
        response = sync()
        response.headers.update(headers)
        return response

    @r.get("/1.0/certificates/{fingerprint}")
    async def get_certificate(request: web.Request) -> web.Response:
        return sync(render(_find(request, request.match_info["fingerprint"])))

    @r.delete("/1.0/certificates/{fingerprint}")
    async def delete_certificate(request: web.Request) -> web.Response:
        row = _find(request, request.match_info["fingerprint"])
        await daemon(request).trust.remove(row.fingerprint)
        return sync()


def _find(request: web.Request, prefix: str) -> CertificateRow:
    matches = [row for row in daemon(request).trust.certificates() if row.fingerprint.startswith(prefix)]
    if len(matches) != 1:
        raise NotFound(f"Certificate {prefix!r} not found" if not matches else f"Fingerprint {prefix!r} is ambiguous")
    return matches[0]


def _token_secret(value: str) -> str:
    """Incus clients send the whole encoded token; older ones only the secret."""
    try:
        return str(decode_token(value)["secret"])
    except ValueError:
        return value


def _finish_token_operation(request: web.Request, op_id: str) -> None:
    try:
        op = daemon(request).operations.get(op_id)
    except NotFound:
        return
    if not op.status.is_final:
        op.finish_without_task(StatusCode.SUCCESS)


async def _create_token(request: web.Request, name: str) -> web.Response:
    d = daemon(request)
    addresses = d.listen_addresses()
    if not addresses:
        raise PreconditionFailed(
            "The server is not listening on the network, so a token would be useless: "
            "set core.https_address first (stapes config set core.https_address 127.0.0.1:8443)"
        )
    config = await d.store.server_config()
    lifetime = float(config.get("core.remote_token_expiry", "86400"))
    op = d.operations.create(op_class="token", description="Certificate add token", project="default")
    token = await d.trust.create_token(name, lifetime, op.id)

    async def revoke() -> None:
        await d.store.delete_token_by_operation(op.id)

    op.on_cancel = revoke
    op.status = StatusCode.RUNNING
    op.metadata.update({
        "request": {"name": name, "type": "client", "token": True}, "clientName": name,
        "fingerprint": d.certificate_fingerprint, "addresses": addresses, "secret": token.secret,
        "expiresAt": token.expires_at,
        "token": encode_token(name, d.certificate_fingerprint, addresses, token.secret, token.expires_at),
    })
    return async_operation(op)
