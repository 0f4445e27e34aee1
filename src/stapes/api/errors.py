"""Error hierarchy shared by server and client.

The server turns each into an Incus-shaped error response with the matching HTTP status; the client turns an
error response back into the same class, so a caller can catch `NotFound` whichever side raised it.
"""

from __future__ import annotations


class StapesError(Exception):
    """Base class: carries the HTTP status the server answers with."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(StapesError):
    status = 400


class Forbidden(StapesError):
    status = 403


class NotFound(StapesError):
    status = 404


class Conflict(StapesError):
    status = 409


class PreconditionFailed(StapesError):
    status = 412


class RequestTooLarge(StapesError):
    status = 413


class InternalError(StapesError):
    status = 500


class Unavailable(StapesError):
    """The server could not be reached or is not ready (client side: connection failures)."""

    status = 503


_BY_STATUS: dict[int, type[StapesError]] = {
    cls.status: cls for cls in (BadRequest, Forbidden, NotFound, Conflict, PreconditionFailed, RequestTooLarge,
                                 Unavailable)
}


def error_for_status(status: int, message: str) -> StapesError:
    return _BY_STATUS.get(status, StapesError)(message)
