"""Incus status codes, used for operations and instance states alike."""

from __future__ import annotations

from enum import IntEnum


class StatusCode(IntEnum):
    OPERATION_CREATED = 100
    STARTED = 101
    STOPPED = 102
    RUNNING = 103
    CANCELLING = 104
    PENDING = 105
    STARTING = 106
    STOPPING = 107
    ABORTING = 108
    FREEZING = 109
    FROZEN = 110
    THAWED = 111
    ERROR = 112
    READY = 113
    SUCCESS = 200
    FAILURE = 400
    CANCELLED = 401

    @property
    def label(self) -> str:
        return _LABELS[self]

    @property
    def is_final(self) -> bool:
        return self in (StatusCode.SUCCESS, StatusCode.FAILURE, StatusCode.CANCELLED)


_LABELS = {
    StatusCode.OPERATION_CREATED: "Operation created",
    StatusCode.STARTED: "Started",
    StatusCode.STOPPED: "Stopped",
    StatusCode.RUNNING: "Running",
    StatusCode.CANCELLING: "Cancelling",
    StatusCode.PENDING: "Pending",
    StatusCode.STARTING: "Starting",
    StatusCode.STOPPING: "Stopping",
    StatusCode.ABORTING: "Aborting",
    StatusCode.FREEZING: "Freezing",
    StatusCode.FROZEN: "Frozen",
    StatusCode.THAWED: "Thawed",
    StatusCode.ERROR: "Error",
    StatusCode.READY: "Ready",
    StatusCode.SUCCESS: "Success",
    StatusCode.FAILURE: "Failure",
    StatusCode.CANCELLED: "Cancelled",
}
