"""Standard Webhooks signatures on what taskd sends: callbacks and http handler requests.

A receiver holding one of [server] signing_secrets can tell that a request came from
taskd, unchanged, and recently (https://www.standardwebhooks.com): each request carries
  webhook-id         the message, the same each time the same message is sent again;
  webhook-timestamp  when this copy was sent, in integer Unix seconds;
  webhook-signature  "v1,<base64 HMAC-SHA256 of '<id>.<timestamp>.<body>'>", one per
                     secret, separated by spaces, so a receiver given either of two
                     secrets (while one replaces the other) finds its own.
The body is signed as the very bytes sent. With no secret configured nothing is signed
and none of these headers is sent.
"""

from __future__ import annotations

import base64
import hmac
import time
from collections.abc import Callable, Sequence

from taskd.config import ServerConfig
from taskd.jobs import Job


def callback_id(job: Job) -> str:
    """The webhook-id of a job's callback: the job, the state it ended in and the number of
    the attempt it ended after (0: cancelled before any). Every delivery of one callback,
    by any daemon, has it; a job retried by hand that ends again calls back under another."""
    return f"{job.id}_{job.state}_{job.attempt_number}"


def attempt_id(job: Job) -> str:
    """The webhook-id of an http handler's requests for one attempt of a job: the job and
    the attempt's number, counting every attempt it has had (Job.attempt_number). The
    attempt's redirects carry it, and so does the attempt sent again after a daemon gave
    it back uncounted (it stopped); a retry, or an attempt after a crash (the reaper
    counts the lost one), is a new message."""
    return f"{job.id}_attempt_{job.attempt_number}"


class Signer:
    """Signs requests with every configured key; with none, adds no header at all."""

    def __init__(self, *, keys: Sequence[bytes] = (), clock: Callable[[], float] = time.time):
        self._keys = tuple(keys)
        self._clock = clock

    @classmethod
    def from_config(cls, server: ServerConfig) -> Signer:
        return cls(keys=[secret.key for secret in server.signing_secrets])

    def __repr__(self) -> str:
        return f"Signer({len(self._keys)} keys)"  # never the keys themselves

    def headers(self, message_id: str, body: bytes) -> dict[str, str]:
        """The headers that sign `body` as message `message_id`, sent now."""
        if not self._keys:
            return {}
        timestamp = str(int(self._clock()))
        signed = f"{message_id}.{timestamp}.".encode() + body
        signatures = " ".join(
            "v1," + base64.b64encode(hmac.digest(key, signed, "sha256")).decode()
            for key in self._keys
        )
        return {
            "webhook-id": message_id,
            "webhook-timestamp": timestamp,
            "webhook-signature": signatures,
        }


# Signs nothing: what a component given no signer uses.
UNSIGNED = Signer()
