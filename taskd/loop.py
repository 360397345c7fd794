"""The loop every cooperating task runs its passes in, and its one error policy: one
traceback per outage, then a short reminder a minute, and one line when it is over."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import NoReturn

import anyio

# How often a loop that keeps failing says so again (without the traceback): a Redis
# that is down or full must not fill the disk with the same story every half second.
REMINDER_INTERVAL = 60.0


class Outage:
    """Tracks one loop's run of failures; call failed() in its except, ok() after a pass.

    `what` names the work ("promoting due jobs"), `logger` is the loop's module logger.
    """

    def __init__(
        self,
        what: str,
        logger: logging.Logger,
        *,
        clock: Callable[[], float] = time.monotonic,
        reminder_interval: float = REMINDER_INTERVAL,
    ) -> None:
        self._what = what
        self._logger = logger
        self._clock = clock
        self._interval = reminder_interval
        self._since: float | None = None  # when the current outage began
        self._reminded = 0.0
        self._failures = 0

    @property
    def failures(self) -> int:
        """Failures in a row so far (0 when the last pass succeeded)."""
        return self._failures

    def failed(self, exc: BaseException) -> None:
        """A pass failed with `exc`: the first of an outage is logged with its traceback,
        later ones only as a reminder every REMINDER_INTERVAL seconds."""
        now = self._clock()
        self._failures += 1
        if self._since is None:
            self._since = self._reminded = now
            self._logger.warning("%s failed; retrying", self._what, exc_info=exc)
        elif now - self._reminded >= self._interval:
            self._reminded = now
            self._logger.warning(
                "%s still failing after %.0f s (%d tries): %s",
                self._what, now - self._since, self._failures, _brief(exc),
            )  # fmt: skip
        else:
            self._logger.debug("%s failed again: %s", self._what, _brief(exc))

    def ok(self) -> None:
        """A pass succeeded: an outage, if there was one, is over."""
        if self._since is not None:
            self._logger.info(
                "%s works again, after %.0f s and %d failures",
                self._what, self._clock() - self._since, self._failures,
            )  # fmt: skip
        self._since = None
        self._failures = 0


def _brief(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def repeat(
    step: Callable[[], Awaitable[object]], *, outage: Outage, retry_delay: float
) -> NoReturn:
    """Run `step` (one pass and its own wait for the next) until cancelled.

    A pass that raises is reported to `outage` and tried again after `retry_delay`
    seconds, so a Redis outage neither ends a task nor floods the log. Cancellation is
    not an Exception: it ends the loop at once.
    """
    while True:
        try:
            await step()
        except Exception as exc:
            outage.failed(exc)
            await anyio.sleep(retry_delay)
        else:
            outage.ok()
