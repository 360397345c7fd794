"""Signed requests: callbacks and http handler requests carry Standard Webhooks signatures,
checked here by a real receiver with an independent implementation (the standardwebhooks
package) and with the verification code docs/security.md shows."""

from __future__ import annotations

import base64
import functools
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web
from multidict import CIMultiDict
from standardwebhooks import Webhook, WebhookVerificationError

from taskd.jobs import Job
from taskd.signing import UNSIGNED, Signer, attempt_id, callback_id
from tests.builders import new_job, write_daemon_config
from tests.support import (
    REPO,
    DaemonProcess,
    base_url,
    get_json,
    make_config,
    post_json,
    running_daemon,
    wait_healthy,
    wait_until,
)
from tests.test_docs import blocks_named


def make_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


SECRET_A, SECRET_B, SECRET_C = make_secret(), make_secret(), make_secret()


@dataclass(frozen=True)
class Received:
    """One request as it reached the receiver: its headers and its raw body."""

    method: str
    path: str
    headers: CIMultiDict[str]
    body: bytes


@dataclass
class Receiver:
    """A real HTTP endpoint on a free port. /hook records each request, fails the first
    `failures` with 503 and answers the others {"ok": true}; /moved redirects to /hook
    with a 307, which keeps the body. While `holding`, requests wait for `release`."""

    base: str = ""
    failures: int = 0
    holding: bool = False
    requests: list[Received] = field(default_factory=list)
    release: anyio.Event = field(default_factory=anyio.Event)

    def url(self, path: str = "/hook") -> str:
        return f"{self.base}{path}"

    async def hook(self, request: web.Request) -> web.Response:
        await self._record(request)
        if self.failures > 0:
            self.failures -= 1
            return web.Response(status=503)
        return web.json_response({"ok": True})

    async def moved(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.Response(status=307, headers={"Location": "/hook"})

    async def _record(self, request: web.Request) -> None:
        body = await request.read()
        self.requests.append(Received(request.method, request.path, request.headers.copy(), body))
        if self.holding:
            await self.release.wait()

    async def count(self, n: int) -> bool:
        return len(self.requests) >= n

    def ids(self) -> list[str]:
        return [r.headers.get("webhook-id", "") for r in self.requests]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    recv = Receiver()
    app = web.Application()
    app.router.add_route("*", "/hook", recv.hook)
    app.router.add_route("*", "/moved", recv.moved)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()  # port 0: a free one
    recv.base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield recv
    finally:
        recv.release.set()
        await runner.cleanup()


@functools.cache
def snippet(name: str) -> dict[str, Any]:
    """What the Python block docs/security.md marks `<!-- code: NAME -->` defines."""
    [block] = blocks_named("code", name)
    assert block.lang == "python", block.where
    namespace: dict[str, Any] = {}
    exec(compile(block.body, block.where, "exec"), namespace)
    return namespace


def doc_verify() -> Callable[[str, Any, bytes], str]:
    """The standard-library verification of docs/security.md."""
    verify: Callable[[str, Any, bytes], str] = snippet("verify-stdlib")["verify"]
    return verify


def doc_verified_json() -> Callable[[str, Any, bytes], Any]:
    """The standardwebhooks verification of docs/security.md."""
    verified: Callable[[str, Any, bytes], Any] = snippet("verify-standardwebhooks")["verified_json"]
    return verified


def assert_verifies(request: Received, *secrets: str) -> Any:
    """Every way of verifying accepts the request with each secret; the body, parsed."""
    parsed = None
    for secret in secrets:
        parsed = Webhook(secret).verify(request.body, dict(request.headers))
        assert doc_verified_json()(secret, request.headers, request.body) == parsed
        assert doc_verify()(secret, request.headers, request.body) == request.headers["webhook-id"]
    return parsed


def assert_refused(secret: str, headers: Any, body: bytes) -> None:
    """Every way of verifying refuses the request."""
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body, dict(headers))
    with pytest.raises(WebhookVerificationError):
        doc_verified_json()(secret, headers, body)
    with pytest.raises(ValueError, match=r"timestamp|signature"):
        doc_verify()(secret, headers, body)


def signed_by(*secrets: str, **sections: Any) -> dict[str, Any]:
    return {"server": {"signing_secrets": list(secrets)}, **sections}


async def submit(url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        status, job = await post_json(session, f"{url}/jobs", body)
    assert status == 201, job
    return job


async def retry(url: str, job_id: str) -> None:
    async with aiohttp.ClientSession() as session:
        status, answer = await post_json(session, f"{url}/jobs/{job_id}/retry", {})
    assert status == 200, answer


# The signer alone


def test_a_signature_is_the_one_standardwebhooks_makes() -> None:
    key = base64.b64decode(SECRET_A.removeprefix("whsec_"))
    signer = Signer(keys=[key], clock=lambda: 1_700_000_000.9)
    headers = signer.headers("msg_1", b'{"x": 1}')
    at = datetime.fromtimestamp(1_700_000_000, UTC)
    assert headers == {
        "webhook-id": "msg_1",
        "webhook-timestamp": "1700000000",  # whole seconds, at the time of sending
        "webhook-signature": Webhook(SECRET_A).sign("msg_1", at, b'{"x": 1}'),
    }
    assert UNSIGNED.headers("msg_1", b"{}") == {}
    assert repr(signer) == "Signer(1 keys)"


def test_message_ids_name_the_job_and_its_attempt() -> None:
    running = new_job(id="j", state="active", attempts=2, earlier_attempts=3)
    assert attempt_id(running) == "j_attempt_5"
    ended = new_job(id="j", state="failed", attempts=1)
    assert callback_id(ended) == "j_failed_1"
    never_ran: Job = new_job(id="j", state="cancelled")
    assert callback_id(never_ran) == "j_cancelled_0"


# Callbacks


async def test_a_callback_carries_a_signature_per_secret(
    redis_url: str, receiver: Receiver
) -> None:
    config = make_config(redis_url, **signed_by(SECRET_A, SECRET_B))
    async with running_daemon(config) as daemon:
        body = {"type": "echo", "payload": {"n": 1}, "callback_url": receiver.url()}
        job = await submit(base_url(daemon), body)
        await wait_until(lambda: receiver.count(1), "the callback")
    [request] = receiver.requests
    assert request.headers["webhook-id"] == f"{job['id']}_completed_1"
    assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 300
    signatures = request.headers["webhook-signature"].split(" ")
    assert len(signatures) == 2
    assert all(s.startswith("v1,") for s in signatures)
    record = assert_verifies(request, SECRET_A, SECRET_B)  # either secret alone will do
    assert (record["id"], record["state"], record["result"]) == (job["id"], "completed", {"n": 1})


async def test_a_changed_request_or_another_secret_fails_verification(
    redis_url: str, receiver: Receiver
) -> None:
    async with running_daemon(make_config(redis_url, **signed_by(SECRET_A))) as daemon:
        await submit(
            base_url(daemon), {"type": "echo", "payload": 7, "callback_url": receiver.url()}
        )
        await wait_until(lambda: receiver.count(1), "the callback")
    [request] = receiver.requests
    assert_verifies(request, SECRET_A)
    headers, body = request.headers, request.body
    assert b'"result":7' in body
    assert_refused(SECRET_A, headers, body.replace(b'"result":7', b'"result":8'))
    assert_refused(SECRET_B, headers, body)
    for name, value in (
        ("webhook-id", headers["webhook-id"] + "x"),
        ("webhook-timestamp", str(int(headers["webhook-timestamp"]) + 1)),
        ("webhook-signature", headers["webhook-signature"].replace("v1,", "v2,")),
    ):
        changed = headers.copy()
        changed[name] = value
        assert_refused(SECRET_A, changed, body)
    for name in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        missing = headers.copy()
        del missing[name]
        assert_refused(SECRET_A, missing, body)


def test_the_documented_verification_refuses_a_replay_and_takes_what_the_standard_signs() -> None:
    body, webhook = b'{"id": "j"}', Webhook(SECRET_A)

    def signed(at: datetime) -> dict[str, str]:
        stamp = str(int(at.timestamp()))
        signature = webhook.sign("m", at, body)
        return {"Webhook-Id": "m", "Webhook-Timestamp": stamp, "Webhook-Signature": signature}

    now = datetime.now(UTC)
    assert doc_verify()(SECRET_A, CIMultiDict(signed(now)), body) == "m"
    # Unpadded, as taskd's config and standardwebhooks take a secret.
    assert doc_verify()(SECRET_A.rstrip("="), CIMultiDict(signed(now)), body) == "m"
    for off in (timedelta(minutes=6), -timedelta(minutes=6)):  # rightly signed, but not now
        with pytest.raises(ValueError, match="5 minutes"):
            doc_verify()(SECRET_A, CIMultiDict(signed(now - off)), body)


async def test_a_callback_delivered_again_keeps_its_webhook_id(
    redis_url: str, receiver: Receiver
) -> None:
    receiver.failures = 2
    async with running_daemon(make_config(redis_url, **signed_by(SECRET_A))) as daemon:
        job = await submit(base_url(daemon), {"type": "noop", "callback_url": receiver.url()})
        await wait_until(lambda: receiver.count(3), "two failed deliveries and a third")
    assert receiver.ids() == [f"{job['id']}_completed_1"] * 3
    for request in receiver.requests:
        assert_verifies(request, SECRET_A)


async def test_a_callback_another_daemon_sends_again_keeps_its_webhook_id(
    redis_url: str, receiver: Receiver
) -> None:
    """The first daemon stops while its delivery waits for an answer: the callback goes
    back to the outbox, and the second daemon's delivery is the same message."""
    receiver.holding = True
    config = make_config(redis_url, **signed_by(SECRET_A))
    async with running_daemon(config) as first:
        job = await submit(base_url(first), {"type": "noop", "callback_url": receiver.url()})
        await wait_until(lambda: receiver.count(1), "the first daemon's delivery")
    receiver.holding = False
    receiver.release.set()
    async with running_daemon(config):
        await wait_until(lambda: receiver.count(2), "the second daemon's delivery")
    assert receiver.ids() == [f"{job['id']}_completed_1"] * 2
    for request in receiver.requests:
        assert_verifies(request, SECRET_A)


async def test_a_job_retried_by_hand_calls_back_under_a_new_webhook_id(
    redis_url: str, receiver: Receiver
) -> None:
    async with running_daemon(make_config(redis_url, **signed_by(SECRET_A))) as daemon:
        url = base_url(daemon)
        body = {"type": "fail", "max_attempts": 1, "callback_url": receiver.url()}
        job = await submit(url, body)
        await wait_until(lambda: receiver.count(1), "the first callback")
        await retry(url, job["id"])
        await wait_until(lambda: receiver.count(2), "the callback after the retry by hand")
    assert receiver.ids() == [f"{job['id']}_failed_1", f"{job['id']}_failed_2"]
    records = [assert_verifies(request, SECRET_A) for request in receiver.requests]
    assert [r["attempts"] for r in records] == [1, 1]  # attempts start over; the id's N does not


# http handler requests


def hook_handler(receiver: Receiver, path: str, **settings: Any) -> dict[str, Any]:
    return {"hook": {"http": receiver.url(path), "backoff_base": 0.05, **settings}}


async def test_http_handler_requests_are_signed_one_message_per_attempt(
    redis_url: str, receiver: Receiver
) -> None:
    """Two attempts, each redirected once (a 307 keeps the body): every request is signed,
    the redirect carries its attempt's id, and the retry is a new message."""
    receiver.failures = 1  # counted at /hook only: /moved always redirects
    handlers = hook_handler(receiver, "/moved", max_attempts=2)
    config = make_config(redis_url, **signed_by(SECRET_A, SECRET_B), handlers=handlers)
    async with running_daemon(config) as daemon:
        job = await submit(base_url(daemon), {"type": "hook", "payload": {"n": 2}})
        await wait_until(lambda: receiver.count(4), "two attempts of two requests each")
        async with aiohttp.ClientSession() as session:
            await wait_until(
                lambda: _state_is(session, base_url(daemon), job["id"], "completed"),
                "the job to complete",
            )
    first, second = f"{job['id']}_attempt_1", f"{job['id']}_attempt_2"
    assert receiver.ids() == [first, first, second, second]
    assert [r.path for r in receiver.requests] == ["/moved", "/hook"] * 2
    assert [r.headers["X-Taskd-Attempt"] for r in receiver.requests] == ["1", "1", "2", "2"]
    for request in receiver.requests:
        assert assert_verifies(request, SECRET_A, SECRET_B) == {"n": 2}


async def _state_is(session: aiohttp.ClientSession, url: str, job_id: str, state: str) -> bool:
    _, job = await get_json(session, f"{url}/jobs/{job_id}")
    return bool(job["state"] == state)


async def test_an_http_job_retried_by_hand_is_a_new_message(
    redis_url: str, receiver: Receiver
) -> None:
    receiver.failures = 1
    handlers = hook_handler(receiver, "/hook", max_attempts=1)
    config = make_config(redis_url, **signed_by(SECRET_A), handlers=handlers)
    async with running_daemon(config) as daemon, aiohttp.ClientSession() as session:
        url = base_url(daemon)
        job = await submit(url, {"type": "hook"})
        await wait_until(lambda: _state_is(session, url, job["id"], "failed"), "the job to fail")
        await retry(url, job["id"])
        await wait_until(lambda: _state_is(session, url, job["id"], "completed"), "its second life")
    assert receiver.ids() == [f"{job['id']}_attempt_1", f"{job['id']}_attempt_2"]
    assert [r.headers["X-Taskd-Attempt"] for r in receiver.requests] == ["1", "1"]
    for request in receiver.requests:
        assert_verifies(request, SECRET_A)


async def test_an_attempt_a_stopping_daemon_gives_back_is_sent_again_under_its_id(
    redis_url: str, receiver: Receiver
) -> None:
    """Past its shutdown_timeout a stopping daemon gives its running jobs back with the
    attempt uncounted: the attempt is sent again, by another daemon, as the same message."""
    receiver.holding = True
    handlers = hook_handler(receiver, "/hook")
    config = make_config(redis_url, **signed_by(SECRET_A), handlers=handlers)
    async with running_daemon(config) as first:
        job = await submit(base_url(first), {"type": "hook", "payload": "p"})
        await wait_until(lambda: receiver.count(1), "the first daemon's request")
    receiver.holding = False
    receiver.release.set()
    async with running_daemon(config) as second, aiohttp.ClientSession() as session:
        url = base_url(second)
        await wait_until(lambda: _state_is(session, url, job["id"], "completed"), "the job")
        _, record = await get_json(session, f"{url}/jobs/{job['id']}")
    assert record["attempts"] == 1
    assert receiver.ids() == [f"{job['id']}_attempt_1"] * 2
    for request in receiver.requests:
        assert assert_verifies(request, SECRET_A) == "p"


async def test_nothing_is_signed_without_a_secret(redis_url: str, receiver: Receiver) -> None:
    config = make_config(redis_url, handlers=hook_handler(receiver, "/hook"))
    async with running_daemon(config) as daemon:
        await submit(base_url(daemon), {"type": "hook", "callback_url": receiver.url()})
        await wait_until(lambda: receiver.count(2), "the request and the callback")
    for request in receiver.requests:
        assert request.headers["X-Taskd-Job-Id"]
        assert not [name for name in request.headers if name.lower().startswith("webhook-")]


# Secrets from the environment, never shown


async def test_secrets_from_the_environment_replace_the_files_and_are_never_shown(
    redis_url: str, receiver: Receiver, tmp_path: Path, free_port: Any
) -> None:
    port = free_port()
    path = write_daemon_config(
        tmp_path / "taskd.toml",
        port,
        server={"signing_secrets": [SECRET_A]},
        callbacks={"allow": ["127.0.0.0/8"]},
        handlers={"echo": {"builtin": "echo"}, **hook_handler(receiver, "/hook")},
    )
    env = {
        "TASKD_REDIS_URL": redis_url,
        "PYTHONPATH": str(REPO),
        "TASKD_SIGNING_SECRETS": f"{SECRET_B}, {SECRET_C}",
    }
    daemon = DaemonProcess(["--log-level", "debug", "--config", str(path)], cwd=tmp_path, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(url, daemon)
        job = await submit(url, {"type": "hook", "payload": 1, "callback_url": receiver.url()})
        await wait_until(lambda: receiver.count(2), "the http request and the callback")
        async with aiohttp.ClientSession() as session:
            shown = [await _text(session, f"{url}{page}") for page in PAGES]
            shown.append(await _text(session, f"{url}/jobs/{job['id']}"))
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0
    finally:
        daemon.kill()
    for request in receiver.requests:
        assert_verifies(request, SECRET_B, SECRET_C)
        assert_refused(SECRET_A, request.headers, request.body)  # the file's, replaced
    shown.append(daemon.output())
    for secret in (SECRET_A, SECRET_B, SECRET_C):
        for text in shown:
            assert secret.removeprefix("whsec_") not in text


PAGES = ("/stats", "/metrics", "/health", "/schedules", "/jobs?state=completed")


async def _text(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url) as response:
        assert response.status == 200, url
        return await response.text()
