"""The OpenAPI document (taskd.openapi): valid OpenAPI 3.1, served at /openapi.json, and in
step with the code: the router's routes, the documents the daemon answers, the limits
validation enforces, the token guard and the error codes the code can answer."""

from __future__ import annotations

import ast
import inspect
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import aiohttp
import jsonschema_rs
import orjson
import pytest
from openapi_spec_validator import validate

from taskd import api as api_module
from taskd.client import documents
from taskd.config import ScheduleConfig, ServerConfig
from taskd.daemon import Daemon
from taskd.openapi import ERRORS, FALLBACK_CODE, describe
from taskd.store import Store
from taskd.validation import SUBMIT_FIELDS
from tests.builders import new_job
from tests.support import (
    BUILTINS,
    REPO,
    Api,
    DaemonApi,
    base_url,
    get_json,
    make_config,
    post_json,
    running_daemon,
    wait_for_state,
    wait_until,
)

TOKEN = "a-token-of-24-characters"
TYPES = sorted(BUILTINS)


def document_of(daemon: Daemon) -> dict[str, Any]:
    return describe(server=daemon.config.server, job_types=daemon.config.handlers)


def schema_of(document: dict[str, Any], name: str) -> jsonschema_rs.Validator:
    """A validator of one of the document's component schemas, its references resolved."""
    root = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    return jsonschema_rs.Draft202012Validator(root, validate_formats=True)


def conforms(document: dict[str, Any], name: str, instance: Any) -> None:
    """Fail, saying why, unless `instance` is valid against the schema `name`."""
    errors = [str(e).splitlines()[0] for e in schema_of(document, name).iter_errors(instance)]
    assert not errors, f"{name}: {errors}\n{instance}"


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            yield method.upper(), path, operation


@pytest.mark.parametrize(
    "server",
    [
        ServerConfig(),
        ServerConfig(token=TOKEN),
        ServerConfig(token=TOKEN, public_reads=True, public_health=False, public_metrics=False),
    ],
    ids=["no-token", "token", "token-public-reads"],
)
def test_the_document_is_valid_openapi_3_1(server: ServerConfig) -> None:
    document = describe(server=server, job_types=TYPES)
    assert document["openapi"].startswith("3.1.")
    validate(document)  # raises, saying where, on anything OpenAPI 3.1 does not allow


def test_every_route_is_an_operation_and_every_operation_a_route(daemon: Daemon) -> None:
    # aiohttp answers HEAD for every GET by itself; the document lists the GET.
    routed = {
        (route.method, route.resource.canonical)
        for route in daemon.api.app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    described = {(method, path) for method, path, _ in operations(document_of(daemon))}
    assert routed == described


@pytest.mark.parametrize(
    ("server", "without_token"),
    [({}, 200), ({"token": TOKEN}, 401), ({"token": TOKEN, "public_reads": True}, 200)],
)
async def test_openapi_json_is_this_daemons_document_and_a_read_as_others_are(
    daemon_api: DaemonApi, server: dict[str, Any], without_token: int
) -> None:
    async with daemon_api(server=server) as (daemon, (session, url)):
        async with session.get(f"{url}/openapi.json") as response:
            assert response.status == without_token
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with session.get(f"{url}/openapi.json", headers=headers) as response:
            assert response.status == 200
            assert response.content_type == "application/json"
            served = await response.json()
    assert served == orjson.loads(orjson.dumps(document_of(daemon)))
    assert served["components"]["schemas"]["Submission"]["properties"]["type"]["enum"] == TYPES


@pytest.mark.parametrize(
    "server",
    [{"token": TOKEN}, {"token": TOKEN, "public_reads": True, "public_metrics": False}],
    ids=["token", "token-public-reads"],
)
async def test_the_token_is_needed_exactly_where_the_document_says(
    daemon_api: DaemonApi, server: dict[str, Any]
) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with daemon_api(server=server) as (daemon, (session, url)):
        async with session.post(f"{url}/jobs", json={"type": "noop"}, headers=auth) as response:
            job_id = (await response.json())["id"]
        values = {"{id}": job_id, "{queue}": "default", "{name}": "app.js"}
        for method, path, operation in operations(document_of(daemon)):
            for template, value in values.items():
                path = path.replace(template, value)
            # Without the token: refused before anything is done, or served.
            async with session.request(method, url + path) as response:
                needs = "security" in operation
                assert (response.status == 401) == needs, (method, path, response.status)
                if needs:
                    assert operation["security"] == [{"bearer": []}]
                    assert "401" in operation["responses"]


async def test_job_documents_match_the_job_schema(daemon_api: DaemonApi) -> None:
    handlers = {
        **BUILTINS,
        "progress": {"python": "tests.handler_funcs:reports_then_returns"},
    }
    async with daemon_api(handlers=handlers) as (daemon, (session, url)):
        document = document_of(daemon)
        bodies = [
            {"type": "progress", "payload": {"x": 1}, "idempotency_key": "k-1"},
            {"type": "fail", "max_attempts": 2, "callback_url": "http://127.0.0.1:9/"},
            {"type": "echo", "delay": 600, "priority": 9},
        ]
        ids = [(await post_json(session, f"{url}/jobs", body))[1]["id"] for body in bodies]
        jobs = [
            await wait_for_state(session, url, ids[0], {"completed"}),
            await wait_for_state(session, url, ids[1], {"failed"}),
            (await get_json(session, f"{url}/jobs/{ids[2]}"))[1],
        ]
        _, page = await get_json(session, f"{url}/jobs")
        _, dead = await get_json(session, f"{url}/dead")
    # The schema's properties are exactly the keys of a real job, of its history entries and
    # progress, and every document the daemon gave is valid against it.
    schemas = document["components"]["schemas"]
    completed, failed, scheduled = jobs
    assert set(completed) == set(schemas["Job"]["properties"])
    assert set(completed["progress"]) == set(schemas["Progress"]["properties"])
    assert [entry["outcome"] for entry in failed["history"]] == ["retry", "failed"]
    assert set(failed["history"][0]) == set(schemas["HistoryEntry"]["properties"])
    assert scheduled["state"] == "scheduled"
    for job in jobs:
        conforms(document, "Job", job)
    conforms(document, "JobPage", page)
    conforms(document, "JobPage", dead)
    assert len(page["jobs"]) == 3
    assert [job["id"] for job in dead["jobs"]] == [ids[1]]


async def test_archived_job_documents_match_their_schema(
    daemon_api: DaemonApi, archive_url: str
) -> None:
    async with daemon_api(archive={"url": archive_url}) as (daemon, (session, url)):
        _, job = await post_json(session, f"{url}/jobs", {"type": "echo", "payload": {"n": 1}})
        await wait_for_state(session, url, job["id"], {"completed"})
        page: dict[str, Any] = {}

        async def archived() -> bool:
            nonlocal page
            _, page = await get_json(session, f"{url}/archive?type=echo")
            return bool(page["jobs"])

        await wait_until(archived, "the job in the archive")
        async with session.delete(f"{url}/jobs/{job['id']}") as response:
            assert response.status == 200
        _, answered = await get_json(session, f"{url}/jobs/{job['id']}")
        document = document_of(daemon)
    assert answered["archived"] is True
    assert set(answered) == set(document["components"]["schemas"]["ArchivedJob"]["properties"])
    conforms(document, "ArchivedJob", answered)
    conforms(document, "ArchivePage", page)


async def test_stats_and_schedules_match_their_schemas(redis_url: str, store: Store) -> None:
    handlers = {
        **BUILTINS,
        "limited": {"builtin": "echo", "rate_limit": "100/s", "global_concurrency": 2},
    }
    config = replace(
        make_config(redis_url, handlers=handlers),
        schedules=(ScheduleConfig(name="hourly", cron="0 * * * *", type="echo"),),
    )
    async with running_daemon(config) as daemon, aiohttp.ClientSession() as session:
        url = base_url(daemon)
        # A job no daemon has a handler for: /stats names it under no_handler.
        await store.enqueue(new_job("ghost"))
        _, job = await post_json(session, f"{url}/jobs", {"type": "limited", "payload": 1})
        await wait_for_state(session, url, job["id"], {"completed"})
        stats: dict[str, Any] = {}

        async def noticed() -> bool:
            nonlocal stats
            _, stats = await get_json(session, f"{url}/stats")
            return bool(stats["queues"]["default"]["no_handler"])

        await wait_until(noticed, "/stats to name the job without a handler")
        _, listed = await get_json(session, f"{url}/schedules")
        document = document_of(daemon)
    default = stats["queues"]["default"]
    assert set(default) == set(document["components"]["schemas"]["QueueStats"]["properties"])
    assert set(default["limits"]) == {"limited"}
    conforms(document, "Stats", stats)
    assert [schedule["name"] for schedule in listed["schedules"]] == ["hourly"]
    conforms(document, "Schedules", listed)


def test_the_python_clients_documents_have_the_schemas_properties() -> None:
    # The client types what the API answers and takes by hand (taskd.client.documents).
    schemas = describe(server=ServerConfig(), job_types=TYPES)["components"]["schemas"]
    pairs = [
        (documents.Job, "Job"),
        (documents.HistoryEntry, "HistoryEntry"),
        (documents.Progress, "Progress"),
        (documents.NewJob, "Submission"),
        (documents.QueueState, "Paused"),
    ]
    for typed, name in pairs:
        assert set(typed.__annotations__) == set(schemas[name]["properties"]), name


# The submission rules: the document's limits are the ones the daemon enforces.


def submission(document: dict[str, Any]) -> dict[str, Any]:
    return dict(document["components"]["schemas"]["Submission"])


def bound(field: dict[str, Any], key: str) -> Any:
    """A limit of a field, looking inside `anyOf` (nullable fields)."""
    for schema in [field, *field.get("anyOf", [])]:
        if key in schema:
            return schema[key]
    raise AssertionError(f"no {key} in {field}")


async def test_the_documented_fields_are_those_validation_takes(daemon: Daemon, api: Api) -> None:
    session, url = api
    properties = submission(document_of(daemon))["properties"]
    assert tuple(properties) == SUBMIT_FIELDS
    status, answer = await post_json(session, f"{url}/jobs", {"type": "echo", "colour": "red"})
    assert status == 422
    assert answer["error"]["message"].endswith(", ".join(SUBMIT_FIELDS))


@pytest.mark.daemon_config(server={"max_batch": 3})
async def test_the_documented_limits_are_the_ones_the_daemon_enforces(
    daemon: Daemon, api: Api
) -> None:
    session, url = api
    document = document_of(daemon)
    fields = submission(document)["properties"]

    async def status_of(**fields: Any) -> int:
        return (await post_json(session, f"{url}/jobs", {"type": "echo", **fields}))[0]

    for name in ("max_attempts", "priority", "delay"):
        low, high = bound(fields[name], "minimum"), bound(fields[name], "maximum")
        assert [await status_of(**{name: value}) for value in (low, high)] == [201, 201], name
        assert [await status_of(**{name: value}) for value in (low - 1, high + 1)] == [422] * 2
    longest = bound(fields["idempotency_key"], "maxLength")
    assert await status_of(idempotency_key="k" * longest) == 201
    assert await status_of(idempotency_key="k" * (longest + 1)) == 422
    assert await status_of(idempotency_key="") == 422
    start = "http://127.0.0.1/"
    longest = bound(fields["callback_url"], "maxLength")
    assert await status_of(callback_url=start + "p" * (longest - len(start))) == 201
    assert await status_of(callback_url=start + "p" * (longest + 1 - len(start))) == 422
    for job_type in fields["type"]["enum"]:
        assert await status_of(type=job_type) == 201
    assert await status_of(type="not-configured") == 422

    most = document["components"]["schemas"]["Batch"]["properties"]["jobs"]["maxItems"]
    assert most == 3
    for count, status in ((most, 201), (most + 1, 422)):
        body = {"jobs": [{"type": "noop"}] * count}
        assert (await post_json(session, f"{url}/jobs/batch", body))[0] == status

    [limit] = [p for p in document["paths"]["/jobs"]["get"]["parameters"] if p["name"] == "limit"]
    for value, status in ((limit["schema"]["maximum"], 200), (limit["schema"]["maximum"] + 1, 400)):
        assert (await get_json(session, f"{url}/jobs?limit={value}"))[0] == status


# The error codes: those the code can answer, each under its status.


def _answered_codes() -> tuple[set[str], set[tuple[int, str]]]:
    """Every error code in taskd's source, and (status, code) where the status is literal:
    ApiError(status, code, ...) and error_response(status, code, ...) calls, and dicts with
    a "code" key (their status from a status= of a call around them)."""
    codes: set[str] = set()
    pairs: set[tuple[int, str]] = set()
    for path in sorted((REPO / "taskd").rglob("*.py")):
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            found = _code_of(node, parents)
            if found is not None:
                status, code = found
                codes.add(code)
                if status is not None:
                    pairs.add((status, code))
    return codes, pairs


def _code_of(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> tuple[int | None, str] | None:
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) in (
        "ApiError",
        "error_response",
    ):
        status, code = node.args[0], node.args[1]
        if isinstance(code, ast.Constant) and isinstance(code.value, str):
            literal = isinstance(status, ast.Constant) and isinstance(status.value, int)
            return (status.value if literal else None), code.value  # type: ignore[attr-defined]
    if isinstance(node, ast.Dict):
        for key, value in zip(node.keys, node.values, strict=True):
            # A constant: a code; a name is error_response's own body, which its calls fill.
            if (
                isinstance(key, ast.Constant)
                and key.value == "code"
                and isinstance(value, ast.Constant)
            ):
                return _status_around(node, parents), value.value
    return None


def _status_around(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> int | None:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.Call):
            for keyword in node.keywords:
                if keyword.arg == "status" and isinstance(keyword.value, ast.Constant):
                    return int(keyword.value.value)
    return None


def test_the_documented_error_codes_are_those_the_code_answers() -> None:
    codes, pairs = _answered_codes()
    # aiohttp's own errors, which errors_as_json answers with our codes.
    pairs |= {(status, code) for status, (code, _) in api_module._HTTP_CODES.items()}
    codes |= {code for _, code in pairs}
    # And the one it answers for any other status of aiohttp's.
    assert f'"{FALLBACK_CODE}"' in inspect.getsource(api_module.errors_as_json)
    codes.add(FALLBACK_CODE)
    assert codes == set(ERRORS) | {FALLBACK_CODE}
    assert {(status, code) for status, code in pairs} <= {(s, c) for c, (s, _) in ERRORS.items()}


def test_each_error_response_lists_the_codes_of_its_status() -> None:
    document = describe(server=ServerConfig(token=TOKEN), job_types=TYPES)
    responses = document["components"]["responses"]
    listed: dict[int, list[str]] = {}
    for method, path, operation in operations(document):
        for status, response in operation["responses"].items():
            if "$ref" in response:
                name = response["$ref"].rsplit("/", 1)[1]
                schema = responses[name]["content"]["application/json"]["schema"]
                listed[int(status)] = schema["properties"]["error"]["properties"]["code"]["enum"]
            else:
                assert status < "400" or (path, status) == ("/health", "503"), (method, path)
    expected: dict[int, list[str]] = {}
    for code, (status, _) in ERRORS.items():
        expected.setdefault(status, []).append(code)
    # Every status but 405, which no operation answers (a method no endpoint takes does).
    assert listed == {status: codes for status, codes in expected.items() if status != 405}


def test_the_api_docs_list_every_error_code() -> None:
    text = (REPO / "docs" / "api.md").read_text()
    errors = text[text.index("## Errors") :]
    for code, (status, _) in ERRORS.items():
        assert f"| {status} | `{code}` |" in errors, code


async def test_error_answers_match_their_documented_responses(daemon: Daemon, api: Api) -> None:
    session, url = api
    document = document_of(daemon)
    answers = [
        (await post_json(session, f"{url}/jobs", {"type": "nope"})),
        (await get_json(session, f"{url}/jobs?limit=0")),
        (await get_json(session, f"{url}/jobs/01a20ce6-c2d2-7000-89d3-cafddcc8660d")),
    ]
    async with session.post(f"{url}/jobs", data=b"{", headers={"Content-Type": "text/plain"}) as r:
        answers.append((r.status, await r.json()))
    async with session.delete(f"{url}/health") as response:
        answers.append((response.status, await response.json()))
    assert [status for status, _ in answers] == [422, 400, 404, 415, 405]
    for status, answer in answers:
        assert answer["error"]["code"] in [c for c, (s, _) in ERRORS.items() if s == status]
        conforms(document, "Error", answer)
