"""What the client raises: no answer from the daemon, or the daemon's JSON error as an exception."""

from __future__ import annotations

import re

import orjson

from taskd.client.documents import Job

# A batch's error names the bad job: "jobs[3]: unknown job type 'x'".
_BATCH_INDEX = re.compile(r"jobs\[([0-9]+)\]: ")


class TaskdError(Exception):
    """Everything the client raises derives from this; `message` says what happened."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class AddressError(TaskdError, ValueError):
    """The URL, or the config file it was to come from, names no daemon the client can use."""


class TransportError(TaskdError):
    """No answer: the daemon could not be reached, or the connection dropped before it answered.

    `sent` is False when the request cannot have reached the daemon (the connection failed
    before it was written), True when the daemon may have acted on it.
    """

    def __init__(self, message: str, *, sent: bool, transient: bool = True) -> None:
        super().__init__(message)
        self.sent = sent
        self.transient = transient  # worth trying again (a TLS certificate refused is not)


class RequestTimeout(TransportError, TimeoutError):
    """The daemon did not answer within the client's `timeout`; not resent (it is slow, not
    gone, and a resend would only add to its load)."""

    def __init__(self, message: str, *, sent: bool) -> None:
        super().__init__(message, sent=sent, transient=False)


class WaitTimeout(TaskdError, TimeoutError):
    """`wait()` gave up: the job was not in a final state in time. `job` is the last seen."""

    def __init__(self, message: str, job: Job) -> None:
        super().__init__(message)
        self.job = job


class DaemonError(TaskdError):
    """The daemon answered with an error: its HTTP `status` and, from its JSON body
    `{"error": {"code", "message"}}`, the `code` (None when the answer is not the daemon's
    own, e.g. a proxy's) and the `message`. `retry_after`: its Retry-After header, in seconds."""

    def __init__(
        self, status: int, code: str | None, message: str, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retry_after = retry_after

    def __str__(self) -> str:
        if self.code is None:
            return f"{self.status} {self.message}"
        return f"{self.status} {self.code}: {self.message}"


class InvalidRequest(DaemonError):
    """400, 413, 415 or 422: the daemon refused the request as it is (nothing was written).
    For a batch, `index` is the position of the job it names, else None."""

    @property
    def index(self) -> int | None:
        found = _BATCH_INDEX.match(self.message)
        return int(found.group(1)) if found else None


class Unauthorized(DaemonError):
    """401: the daemon has a `[server] token` and the request did not carry it."""


class NotFound(DaemonError):
    """404: no such job (or queue)."""


class Conflict(DaemonError):
    """409: the job's state does not allow it (cancel a finished job, retry one that has not
    failed, delete a running one); the message says its state."""


class Unavailable(DaemonError):
    """503: Redis does not answer or is full, or the daemon is stopping."""


_BY_STATUS: dict[int, type[DaemonError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: InvalidRequest,
    415: InvalidRequest,
    422: InvalidRequest,
    503: Unavailable,
}


def error_of(status: int, reason: str, body: bytes, retry_after: str | None) -> DaemonError:
    """The exception for an error answer: its class by status, code and message from the body."""
    kind = _BY_STATUS.get(status, DaemonError)
    seconds = _seconds(retry_after)
    try:
        error = orjson.loads(body)["error"]
        code, message = error["code"], error["message"]
        if isinstance(code, str) and isinstance(message, str):
            return kind(status, code, message, seconds)
    except (orjson.JSONDecodeError, KeyError, TypeError):
        pass
    # Not our daemon's answer (a proxy's, say): its start says more than nothing.
    text = " ".join(body.decode(errors="replace").split())[:200]
    return kind(status, None, f"{reason}: {text}" if text else reason, seconds)


def _seconds(retry_after: str | None) -> float | None:
    """Retry-After in seconds; the daemon sends delta-seconds (an HTTP date counts as none)."""
    if retry_after is None or not retry_after.strip().isdigit():
        return None
    return float(retry_after.strip())
