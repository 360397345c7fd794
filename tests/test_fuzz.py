"""The daemon fuzzed from its own OpenAPI document with schemathesis: requests that match the
document and requests that do not, and sequences that follow its links. No answer may be a
5xx or differ from what the document says, and the daemon must keep serving."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Flaky
from hypothesis.stateful import run_state_machine_as_test
from schemathesis import GenerationMode

from tests.support import BUILTINS, DaemonProcess, wait_healthy

TOKEN = "a-fuzzing-token-of-32-characters"
# Generated cases per operation and mode, and sequences along the document's links: with
# the deterministic coverage cases, about 1,200 requests: some 15 s on a quiet machine,
# 50 beside the rest of the suite on its workers (hypothesis's generation costs more than
# the daemon's answers). Raise them to search harder: 150 cases found a 500 that these
# do not reach (test_callbacks now holds it).
CASES = 20
SEQUENCES = 15
STEPS = 8
# Seconds from the start within which generated cases and sequences may begin: on a
# machine loaded past what the figures above assume, the run ends short of them (the
# deterministic coverage cases always run in full) rather than past its timeout.
BUDGET = 50.0
# The checks every answer goes through. Left out: positive_data_acceptance, since some
# rules are beyond a JSON schema (an Idempotency-Key header that agrees with the body's
# key, a cursor of the kind its state's listing gives, printable keys, integers written
# without a fraction, a callback destination [callbacks] permits, run_at within a year of
# now), so a request the document allows may still be refused, as the document says it
# may (422 or 400); and object_level_authorization, which needs two identities.
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "negative_data_rejection",
    "missing_required_header",
    "ignored_auth",
    "unsupported_method",
    "allow_header_conformance",
    "use_after_free",
    "ensure_resource_availability",
)
# What a daemon answers a request the document does not allow: schemathesis's list, a body
# past [server] max_body, and a Host it does not answer to (the fuzzer makes up headers,
# an empty Host among them).
REJECTIONS = [
    "400", "401", "403", "404", "405", "406", "409", "413", "415", "421", "422", "428", "429",
]  # fmt: skip
# Never fuzzed: the dashboard's event stream does not end (test_dashboard reads it).
ENDLESS = "/events"
# The kinds of failure in schemathesis's report, e.g. "ST101 Server error".
FAILURE_KIND = re.compile(r"^- (ST\d+ .+)$", re.MULTILINE)


@dataclass
class Fuzzed:
    url: str
    process: DaemonProcess


def config_text(port: int, redis_url: str, archive_url: str) -> str:
    """The daemon's config. Its handlers (the builtins) take their jobs on a queue it does
    not serve: no job runs, so none ever sends its callback_url, which the fuzzer makes up
    (a name would be resolved through the machine's DNS server). Jobs cancelled go to the
    archive, which GET /archive and GET /jobs/ID then read."""
    handlers = "".join(
        f'[handlers.{name}]\nbuiltin = "{name}"\nqueue = "fuzzed"\n\n' for name in sorted(BUILTINS)
    )
    return (
        f'[server]\nlisten = "127.0.0.1:{port}"\ntoken = "{TOKEN}"\nmax_batch = 20\n\n'
        f'[redis]\nurl = "{redis_url}"\n'
        # A loaded machine must not turn a slow Redis answer into a 503.
        "request_timeout = 30\n\n"
        '[workers]\nqueues = ["default"]\nconcurrency = 2\nheartbeat_interval = 0.5\n'
        "shutdown_timeout = 1\n\n"
        f'[archive]\nurl = "{archive_url}"\n\n' + handlers
    )


@pytest.fixture
def fuzzed(
    tmp_path: Path, redis_url: str, archive_url: str, free_port: Callable[[], int]
) -> Iterator[Fuzzed]:
    """A daemon process on the test Redis and PostgreSQL, stopped with SIGTERM afterwards
    (exit 0)."""
    port = free_port()
    config = tmp_path / "taskd.toml"
    config.write_text(config_text(port, redis_url, archive_url))
    process = DaemonProcess(["--config", str(config)], cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        anyio.run(wait_healthy, url, process)
        yield Fuzzed(url, process)
        process.signal(signal.SIGTERM)
        assert process.wait() == 0, process.output()
    finally:
        process.kill()


def load(url: str) -> schemathesis.BaseSchema:
    """The daemon's own document, with the checks, the token and where to send requests."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    document = requests.get(f"{url}/openapi.json", headers=auth, timeout=30).json()
    checks: dict[str, Any] = {name: {"enabled": True} for name in CHECKS}
    checks["negative_data_rejection"]["expected-statuses"] = REJECTIONS
    checks["positive_data_acceptance"] = {"enabled": False}
    checks["object_level_authorization"] = {"enabled": False}
    config = schemathesis.Config.from_dict(
        {
            "base-url": url,
            "auth": {"openapi": {"bearer": {"bearer": TOKEN}}},
            "checks": checks,
            "request-timeout": 30,
        }
    )
    return schemathesis.openapi.from_dict(document, config=config).exclude(path=ENDLESS)


class Run:
    """One fuzzing run: how many requests it sent, and what went wrong, once per kind.

    A failure is recorded, not raised: hypothesis would run a failing case again to report
    it, and a sequence run again meets a daemon whose state has moved on (it takes other
    paths, and hypothesis reports that instead of the failure)."""

    def __init__(self, schema: schemathesis.BaseSchema, *, until: float) -> None:
        self.schema = schema
        self.sent = 0
        self.failures: dict[str, str] = {}
        self.until = until  # time.monotonic() past which no generated run begins
        self.cut = 0  # generated runs (and the sequences) left out past it

    def out_of_time(self) -> bool:
        if time.monotonic() < self.until:
            return False
        self.cut += 1
        return True

    def send(self, case: schemathesis.Case, where: str) -> None:
        """Send a case and check the answer against the document (and the enabled checks)."""
        self.sent += 1
        try:
            case.validate_response(case.call())
        except (Exception, BaseExceptionGroup) as error:
            self.failed(where, error)

    def failed(self, where: str, error: BaseException) -> None:
        kinds = FAILURE_KIND.findall(str(error)) or [type(error).__name__]
        self.failures.setdefault(f"{where}: {kinds}", f"{where}:\n{error}")

    def coverage(self, operation: schemathesis.APIOperation) -> None:
        """The deterministic cases: each bound, each missing or mistyped part, other methods."""
        for case in self.schema.iter_coverage_cases(  # type: ignore[attr-defined]
            operation,
            generation_modes=list(GenerationMode),
            generation_config=self.schema.config.generation_for(operation=operation),
        ):
            self.send(case, f"{operation.label} (coverage)")

    def generated(self, operation: schemathesis.APIOperation, mode: GenerationMode) -> None:
        """CASES cases of hypothesis's, the same ones every run (derandomized)."""
        if self.out_of_time():
            return
        where = f"{operation.label} ({mode.value})"

        @settings(
            max_examples=CASES,
            derandomize=True,
            database=None,
            deadline=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case: schemathesis.Case) -> None:
            self.send(case, where)

        try:
            fuzz()
        except (Exception, BaseExceptionGroup) as error:  # hypothesis's own, e.g. Unsatisfiable
            self.failed(where, error)

    def sequences(self) -> None:
        """Submissions followed, through the document's links, by reads, cancels, retries
        and deletes of the jobs they made."""
        if self.out_of_time():
            return
        run = self

        class Machine(self.schema.as_state_machine()):  # type: ignore[misc]
            def call(self, case: schemathesis.Case, **kwargs: Any) -> Any:
                run.sent += 1
                return super().call(case, **kwargs)

            def validate_response(
                self, response: Any, case: schemathesis.Case, *args: Any, **kwargs: Any
            ) -> None:
                try:
                    super().validate_response(response, case, *args, **kwargs)
                except (Exception, BaseExceptionGroup) as error:
                    run.failed(f"{case.operation.label} (in a sequence)", error)

        try:
            run_state_machine_as_test(
                Machine,
                settings=settings(
                    max_examples=SEQUENCES,
                    stateful_step_count=STEPS,
                    derandomize=True,
                    database=None,
                    deadline=None,
                    phases=[Phase.generate],
                    suppress_health_check=list(HealthCheck),
                ),
            )
        except (Exception, BaseExceptionGroup) as error:
            if not replayed(error):
                self.failed("sequences along the links", error)


def replayed(error: BaseException) -> bool:
    """Whether hypothesis stopped the sequences because one, replayed, went another way: it
    replays the start of earlier ones, and the daemon's state has moved on since (a key
    now taken answers 200, not 201, and the links that follow differ). Not a failure of
    the daemon's: those are recorded as they happen."""
    if isinstance(error, Flaky):
        return True
    trace = error.__traceback__
    while trace is not None and trace.tb_next is not None:
        trace = trace.tb_next
    # Hypothesis asserts, rather than raising Flaky, where a replay draws differently.
    where = trace.tb_frame.f_globals.get("__name__") if trace is not None else None
    return isinstance(error, AssertionError) and where == "hypothesis.internal.conjecture.datatree"


def negatable(operation: schemathesis.APIOperation) -> bool:
    """Whether a request can break the document: a body, the token, or a constrained
    parameter (a bare string has no wrong value)."""
    definition = operation.definition.raw
    constrained = [
        p for p in definition.get("parameters", []) if set(p["schema"]) - {"type", "description"}
    ]
    return bool(constrained or "requestBody" in definition or definition.get("security"))


@pytest.mark.timeout(85)
def test_every_answer_to_a_fuzzed_request_is_as_the_document_says(fuzzed: Fuzzed) -> None:
    started = time.monotonic()
    run = Run(load(fuzzed.url), until=started + BUDGET)
    operations = [result.ok() for result in run.schema.get_all_operations()]
    assert len(operations) == 21  # every operation but the event stream
    for operation in operations:
        run.coverage(operation)
    covered = run.sent
    for operation in operations:
        run.generated(operation, GenerationMode.POSITIVE)
        if negatable(operation):
            run.generated(operation, GenerationMode.NEGATIVE)
    run.sequences()
    assert not run.failures, "\n\n".join(run.failures.values())
    # It kept serving throughout, and still does.
    assert fuzzed.process.proc.poll() is None, fuzzed.process.output()
    assert requests.get(f"{fuzzed.url}/health", timeout=30).status_code == 200
    took = f"{run.sent} requests ({covered} coverage cases) in {time.monotonic() - started:.0f} s"
    assert covered > 400, took
    assert run.cut or run.sent > 900, took
