"""Handlers: run one job through the builtin, python, exec or http handler its type names."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import os
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, Self, TypeVar

import aiohttp
import anyio
import orjson
from yarl import URL

from taskd.config import HandlerConfig, TargetError, resolve
from taskd.egress import DEFAULT_POLICY, Policy, Refused, connector
from taskd.jobs import Job
from taskd.signing import UNSIGNED, Signer, attempt_id

if TYPE_CHECKING:  # opentelemetry, which it imports, is the optional otel extra
    from taskd.tracing import Tracing

logger = logging.getLogger(__name__)

MAX_OUTPUT = 1024 * 1024  # most bytes of stdout / response body kept as the result
STDERR_TAIL = 4096  # bytes of an exec program's stderr kept for the error text
HTTP_ERROR_TAIL = 500  # characters of a failed response's body kept for the error text
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024
# Longest a killed program's output pipes are waited for to close (see _kill_group).
PIPE_GRACE = 1.0
# What an exec program gets of the daemon's environment unasked: enough to find other
# programs and to handle text and time. The rest of it (TASKD_REDIS_URL with its password,
# tokens, cloud credentials) is the daemon's; a handler passes on more by name (pass_env).
BASE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ")

PythonHandler = Callable[[Job], Any]
_T = TypeVar("_T")


class JobFailed(Exception):
    """The attempt failed; str(exc) is the error text stored on the job.

    permanent means retrying cannot help, so the job fails for good at once.
    """

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class Handlers:
    """The handlers of this daemon's job types, ready to run jobs.

    `egress` is where http handlers may connect: by default, public addresses only.
    `signer` signs their requests (by default none), each attempt one message (attempt_id).
    With `tracing`, exec and http handlers are handed the current trace context: the
    attempt's, which the worker pool makes current around run().
    """

    def __init__(
        self,
        configs: Mapping[str, HandlerConfig],
        *,
        egress: Policy = DEFAULT_POLICY,
        signer: Signer = UNSIGNED,
        tracing: Tracing | None = None,
    ) -> None:
        self._tracing = tracing  # None: off
        self._configs = dict(configs)
        self._egress = egress
        self._signer = signer
        self._python: dict[str, tuple[PythonHandler, bool]] = {}
        self._session: aiohttp.ClientSession | None = None
        for job_type, config in self._configs.items():
            if config.kind == "python":
                func = _resolve(config.python, job_type)
                self._python[job_type] = (func, inspect.iscoroutinefunction(func))

    async def __aenter__(self) -> Self:
        # One session for every http handler, so connections are pooled; the
        # handler's own timeout governs, hence no aiohttp total timeout.
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None), connector=connector(self._egress)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def timeout_of(self, job: Job) -> float:
        """Seconds the job's handler may run: the caller enforces it around run() and
        reports a job cancelled by it with timed_out()."""
        config = self._configs.get(job.type)
        return math.inf if config is None else config.timeout

    async def run(self, job: Job) -> bytes:
        """Run the job's handler; its timeout (timeout_of) is the caller's to enforce, and
        its concurrency the worker pool's to keep: claims take no more jobs of a type.

        Return its result as JSON, or raise JobFailed.
        """
        config = self._configs.get(job.type)
        if config is None:
            # Claims take only types this daemon has handlers for; a direct caller erred.
            raise JobFailed(
                f"no handler for type '{job.type}' in this daemon's config", permanent=True
            )
        result = await self._run_guarded(config, job)
        try:
            return orjson.dumps(result)
        except orjson.JSONEncodeError as exc:
            # The same code given the same payload will return the same thing.
            message = f"handler returned a result that is not JSON: {exc}"
            raise JobFailed(message, permanent=True) from None

    def timed_out(self, job: Job) -> JobFailed:
        """The failure of a job whose run() was cancelled at its timeout."""
        timeout = self._configs[job.type].timeout
        logger.warning("job %s (%s) timed out after %g s", job.id, job.type, timeout)
        return JobFailed(f"timed out after {timeout:g} s")

    async def _run_guarded(self, config: HandlerConfig, job: Job) -> Any:
        # Exception, not BaseException: cancellation must pass through untouched.
        try:
            return await self._dispatch(config, job)
        except JobFailed:
            raise
        except Exception as exc:
            logger.debug("job %s (%s) handler raised", job.id, job.type, exc_info=True)
            raise JobFailed(f"{type(exc).__name__}: {exc}") from exc

    def _dispatch(self, config: HandlerConfig, job: Job) -> Awaitable[Any]:
        if config.kind == "builtin":
            return _run_builtin(config.builtin, job)
        if config.kind == "python":
            return self._run_python(job)
        if config.kind == "exec":
            return _run_exec(_require(config.exec, config), config, job, self._trace_env())
        if config.kind == "http":
            return self._run_http(config, URL(_require(config.http, config)), job)
        message = f"unknown handler kind '{config.kind}' for type '{job.type}'"
        raise JobFailed(message, permanent=True)

    def _trace_env(self) -> dict[str, str]:
        """The current trace context as an exec program's TRACEPARENT and TRACESTATE."""
        if self._tracing is None:
            return {}
        return {name.upper(): value for name, value in self._tracing.carrier().items()}

    async def _run_python(self, job: Job) -> Any:
        func, is_async = self._python[job.type]
        if is_async:
            return await func(job)
        # A sync function cannot be interrupted: on timeout or cancellation the
        # job fails (or is cancelled) at once, but the thread runs on to its end.
        return await anyio.to_thread.run_sync(func, job, abandon_on_cancel=True)

    async def _run_http(self, config: HandlerConfig, url: URL, job: Job) -> Any:
        if self._session is None:
            raise RuntimeError("Handlers must be entered with 'async with' to run http jobs")
        headers = {
            "X-Taskd-Job-Id": job.id,
            "X-Taskd-Job-Type": job.type,
            "X-Taskd-Attempt": str(job.attempts),
        }
        if self._tracing is not None:
            # Not signed, nor need they be: a signature covers the body (signing.py).
            headers |= self._tracing.carrier()
        # Redirects are followed here, not by aiohttp: it would re-send the payload on a
        # 307 or 308 to any other site, and each hop's destination must be checked.
        hop = _Hop(url=url, method="POST", data=orjson.dumps(job.payload))
        message = attempt_id(job)
        redirects = 0
        while (answer := await self._send(hop, headers, message, first=redirects == 0)).location:
            if redirects == config.max_redirects:
                raise JobFailed(
                    f"HTTP {answer.status} from {hop.url}: redirect to {answer.location} not "
                    f"followed: [handlers.{config.name}] max_redirects = {config.max_redirects}"
                )
            hop = _redirected(hop, answer.status, answer.location)
            redirects += 1
        return _http_result(job, hop.url, answer)

    async def _send(
        self, hop: _Hop, headers: dict[str, str], message: str, *, first: bool
    ) -> _Answer:
        """One request, signed as `message`, its redirect left unfollowed: the answer, or
        JobFailed."""
        assert self._session is not None
        if hop.data is not None:
            headers = {**headers, "Content-Type": "application/json"}
        # Each hop signed as it is sent: a redirect turned into a GET sends no body.
        headers = {**headers, **self._signer.headers(message, hop.data or b"")}
        try:
            # The configured URL may carry a user and password: the operator's choice.
            self._egress.check_url(hop.url, credentials=True)
            async with self._session.request(
                hop.method, hop.url, data=hop.data, headers=headers, allow_redirects=False
            ) as resp:
                location = resp.headers.get("Location")
                if resp.status in _REDIRECTS and location:
                    return _Answer(status=resp.status, location=location)
                body, truncated = await _read_http_body(resp.content)
                return _Answer(status=resp.status, body=body, truncated=truncated)
        except Refused as exc:
            # Every attempt would ask the configured URL again; a redirect may go elsewhere.
            raise JobFailed(f"request to {hop.url} refused: {exc}", permanent=first) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise JobFailed(f"request to {hop.url} failed: {exc!r}") from exc


@dataclass(frozen=True, slots=True, kw_only=True)
class _Hop:
    """One request of an http job: the first, or one a redirect asked for."""

    url: URL
    method: str
    data: bytes | None


@dataclass(frozen=True, slots=True, kw_only=True)
class _Answer:
    """What one request got: a redirect's location, or the (perhaps cut) body."""

    status: int
    location: str | None = None
    body: bytes = b""
    truncated: bool = False


def _redirected(hop: _Hop, status: int, location: str) -> _Hop:
    """The request a redirect answer asks for, as browsers (and aiohttp) make it."""
    try:
        target = hop.url.join(URL(location))
    except ValueError:
        target = URL()
    if target.scheme not in ("http", "https") or not target.host:
        raise JobFailed(f"HTTP {status} from {hop.url}: redirect to {location!r}, not a web URL")
    if status not in (307, 308):
        # 301, 302 and 303 turn a POST into a GET without a body.
        return _Hop(url=target, method="GET", data=None)
    if target.origin() != hop.url.origin():
        # 307 and 308 keep the method and body: the payload is for the configured site only.
        raise JobFailed(
            f"HTTP {status} from {hop.url}: redirect to {target} not followed: it would "
            "send the payload to another site"
        )
    return _Hop(url=target, method=hop.method, data=hop.data)


def _http_result(job: Job, url: URL, answer: _Answer) -> Any:
    if not 200 <= answer.status < 300:
        tail = answer.body.decode("utf-8", errors="replace")[-HTTP_ERROR_TAIL:].strip()
        permanent = _permanent_status(answer.status)
        raise JobFailed(f"HTTP {answer.status} from {url}: {tail}", permanent=permanent)
    if answer.truncated:
        logger.warning("job %s: response from %s cut at %d bytes", job.id, url, MAX_OUTPUT)
    return _parse_output(answer.body, answer.truncated)


def _permanent_status(status: int) -> bool:
    # A 4xx says the request itself is wrong, and the same payload will be wrong
    # again; but 408 and 429 mean "not now", like a 5xx, and a later try may succeed.
    return 400 <= status < 500 and status not in (408, 429)


def _resolve(spec: str | None, job_type: str) -> PythonHandler:
    """The function named by "package.module:function", as the config checked it."""
    try:
        return resolve(spec or "")
    except TargetError as e:
        # The same class (a NoCallable is an AttributeError too), naming the job type.
        raise type(e)(f"handler '{job_type}': python {e}") from e


def _require(value: _T | None, config: HandlerConfig) -> _T:
    if value is None:
        message = f"handler '{config.name}' of kind {config.kind} has no {config.kind} set"
        raise JobFailed(message, permanent=True)
    return value


def _parse_output(data: bytes, truncated: bool) -> Any:
    """Output as JSON if it parses, else as text; nothing at all is None."""
    if not data.strip():
        return None
    if not truncated:  # a cut-off document is never the JSON the program meant
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    text = data.decode("utf-8", errors="replace").rstrip("\r\n")
    if truncated:
        text += f"\n[output truncated at {MAX_OUTPUT} bytes]"
    return text


async def _read_http_body(stream: aiohttp.StreamReader) -> tuple[bytes, bool]:
    # Stop at the cap rather than drain: leaving the body unread makes aiohttp
    # drop the connection, which is cheaper than reading an unbounded body.
    body = bytearray()
    while len(body) < MAX_OUTPUT:
        chunk = await stream.read(MAX_OUTPUT - len(body))
        if not chunk:
            return bytes(body), False
        body += chunk
    return bytes(body), bool(await stream.read(1))


# ---------------------------------------------------------------- builtin


async def _run_builtin(name: str | None, job: Job) -> Any:
    if name == "echo":
        return job.payload
    if name == "noop":
        return None
    if name == "sleep":
        await anyio.sleep(_sleep_seconds(job.payload))
        return None
    if name == "fail":
        _fail(job.payload)
    raise JobFailed(f"unknown builtin handler '{name}'", permanent=True)


def _fail(payload: Any) -> NoReturn:
    message = "failed on purpose (builtin fail)"
    permanent = False
    if isinstance(payload, dict):
        if isinstance(payload.get("message"), str):
            message = payload["message"]
        permanent = payload.get("permanent") is True
    raise JobFailed(message, permanent=permanent)


def _sleep_seconds(payload: Any) -> float:
    seconds = payload.get("seconds") if isinstance(payload, dict) else None
    if (
        isinstance(seconds, int | float)
        and not isinstance(seconds, bool)  # JSON true is no number of seconds
        and math.isfinite(seconds)
        and seconds >= 0
    ):
        return float(seconds)
    need = 'builtin sleep needs a payload like {"seconds": 1.5} with a number >= 0'
    raise JobFailed(f"{need}, got {payload!r}", permanent=True)


# ---------------------------------------------------------------- exec


async def _run_exec(
    argv: tuple[str, ...], config: HandlerConfig, job: Job, trace_env: Mapping[str, str]
) -> Any:
    # Shielded: a cancellation (the job's timeout, a stop) that came while the program was
    # being started would cut short the event loop's own clean-up of it, leaving it to the
    # loop's child watcher, unreaped and its pipes open should the loop close first. It
    # takes effect at the first wait below instead, which kills the group and reaps it.
    with anyio.CancelScope(shield=True):
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=_exec_env(config, job, trace_env),
            start_new_session=True,  # its own process group, so a kill reaches grandchildren
        )
    try:
        stdout, stderr = await _communicate(proc, orjson.dumps(job.payload))
        code = await proc.wait()
    except BaseException:
        # Timeout, cancellation or a bug: leave nothing of the program running.
        await _kill_group(proc)
        raise
    if code != 0:
        # A signal death is negative, so never in the list: it stays retryable.
        permanent = code in config.permanent_exit_codes
        raise JobFailed(_exit_error(code, bytes(stderr.data), permanent), permanent=permanent)
    if stdout.dropped:
        logger.warning("job %s: stdout cut at %d bytes", job.id, MAX_OUTPUT)
    return _parse_output(bytes(stdout.data), stdout.dropped > 0)


def _exec_env(config: HandlerConfig, job: Job, trace_env: Mapping[str, str]) -> dict[str, str]:
    """The whole environment of the job's program: BASE_ENV and the handler's pass_env
    where the daemon has them, then the handler's env, then the attempt's trace context
    (`trace_env`: TRACEPARENT, TRACESTATE), then the job's TASKD_* variables."""
    names = (*BASE_ENV, *config.pass_env)
    env = {name: os.environ[name] for name in names if name in os.environ}
    # A program that runs others by bare name needs a PATH; without one each would guess.
    env.setdefault("PATH", os.defpath)
    env.update(config.env)
    env.update(trace_env)
    # Last, so nothing overrides them (the config refuses TASKD_* names anyway).
    env.update(
        TASKD_JOB_ID=job.id,
        TASKD_JOB_TYPE=job.type,
        TASKD_QUEUE=job.queue,
        TASKD_ATTEMPT=str(job.attempts),
    )
    return env


class _Capture:
    """Bytes of one output pipe: the first `limit` (keep="head") or the last (keep="tail")."""

    def __init__(self, limit: int, keep: str) -> None:
        self.limit = limit
        self.keep = keep
        self.data = bytearray()
        self.dropped = 0

    async def drain(self, stream: asyncio.StreamReader | None) -> None:
        # Read to the end even past the limit: a program blocked writing to a
        # full pipe would never exit.
        if stream is None:
            return
        while chunk := await stream.read(_CHUNK):
            self._add(chunk)

    def _add(self, chunk: bytes) -> None:
        if self.keep == "head":
            room = max(0, self.limit - len(self.data))
            self.data += chunk[:room]
            self.dropped += max(0, len(chunk) - room)
            return
        self.data += chunk
        excess = len(self.data) - self.limit
        if excess > 0:
            del self.data[:excess]
            self.dropped += excess


async def _communicate(proc: asyncio.subprocess.Process, data: bytes) -> tuple[_Capture, _Capture]:
    stdout = _Capture(MAX_OUTPUT, keep="head")
    stderr = _Capture(STDERR_TAIL, keep="tail")
    async with anyio.create_task_group() as tg:
        tg.start_soon(_feed_stdin, proc.stdin, data)
        tg.start_soon(stdout.drain, proc.stdout)
        tg.start_soon(stderr.drain, proc.stderr)
    return stdout, stderr


async def _feed_stdin(stdin: asyncio.StreamWriter | None, data: bytes) -> None:
    # A program may exit or close stdin without reading it all: its choice, judged by its
    # exit status alone. The loop may then have closed our end before this task runs, and
    # a write to a closed transport raises RuntimeError under uvloop (asyncio's own loop
    # drops it with a warning), so look first: write() is synchronous, nothing can close
    # the pipe between the look and the write. Once written, a pipe closed by the other
    # end fails drain() with a ConnectionError (BrokenPipeError, ConnectionResetError).
    if stdin is None:
        return
    try:
        if not stdin.is_closing():
            stdin.write(data)
            await stdin.drain()
    except ConnectionError:
        pass
    finally:
        stdin.close()


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    # With start_new_session the child leads its own group: pgid == pid.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.stdin is not None:
        proc.stdin.close()
    # Shielded so a cancelled job still reaps its child before cancellation goes on.
    with anyio.CancelScope(shield=True):
        await proc.wait()
        # Its output pipes close once the group is gone and the loop has read their end:
        # read it here, so that nothing of the program is left open when the job is over.
        # Bounded: a process that left the group (setsid) may hold them open.
        with anyio.move_on_after(PIPE_GRACE):
            for stream in (proc.stdout, proc.stderr):
                while stream is not None and await stream.read(_CHUNK):
                    pass


def _exit_error(code: int, stderr: bytes, permanent: bool) -> str:
    if code < 0:
        try:
            how = f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            how = f"killed by signal {-code}"
    else:
        how = f"exit status {code} (permanent)" if permanent else f"exit status {code}"
    tail = stderr.decode("utf-8", errors="replace").strip()
    return f"{how}: {tail}" if tail else how
