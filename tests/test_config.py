"""Tests of the configuration loader: defaults, the shipped example, every validation rule."""

from __future__ import annotations

import ast
import base64
import dataclasses
import datetime
import ipaddress
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tomllib
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskd import config
from taskd.config import (
    ArchiveConfig,
    AutoscaleConfig,
    CallbacksConfig,
    Config,
    ConfigError,
    HandlerConfig,
    RateLimit,
    RedisConfig,
    RetentionConfig,
    ServerConfig,
    TracingConfig,
    WorkersConfig,
    load,
    parse,
)
from tests.support import TASKD

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "taskd.toml"
ECHO = '[handlers.echo]\nbuiltin = "echo"\n'
TOP_KEYS = (
    "server, redis, workers, retention, callbacks, archive, autoscale, handlers, schedules, tracing"
)
SERVER_KEYS = (
    "listen, max_body, max_batch, idempotency_ttl, token, allowed_hosts, public_reads,"
    " public_health, public_metrics, keepalive_timeout, request_read_timeout, max_connections,"
    " signing_secrets"
)
HANDLER_KEYS = (
    "builtin, python, exec, http, queue, timeout, concurrency, max_attempts, backoff_base, "
    "backoff_max, permanent_exit_codes, rate_limit, global_concurrency, env, pass_env, "
    "max_redirects"
)


def problems_of(text: str) -> list[str]:
    """The problems parse() reports for a TOML text; a valid handler is added if none is given."""
    if "[handlers" not in text and "handlers =" not in text:
        text += "\n" + ECHO
    with pytest.raises(ConfigError) as info:
        parse(tomllib.loads(text), env={})
    return info.value.problems


def parse_text(text: str, env: dict[str, str] | None = None) -> Config:
    return parse(tomllib.loads(text), env={} if env is None else env)


# The shipped example


def test_shipped_example_loads_and_documents_the_defaults() -> None:
    cfg = load(EXAMPLE, env={})
    assert cfg.source == str(EXAMPLE)
    assert cfg.server == ServerConfig()
    assert cfg.redis == RedisConfig()
    assert cfg.workers == WorkersConfig()
    assert cfg.retention == RetentionConfig()
    assert cfg.callbacks == CallbacksConfig()
    assert cfg.archive == ArchiveConfig()
    assert cfg.autoscale == AutoscaleConfig()
    assert cfg.tracing == TracingConfig()
    assert list(cfg.handlers) == ["echo", "noop", "sleep", "fail"]
    for name, handler in cfg.handlers.items():
        assert handler == HandlerConfig(name=name, kind="builtin", builtin=name)


def test_shipped_example_commented_handlers_are_well_formed() -> None:
    # Uncommented, the examples (handlers, the token, a schedule, the archive, tracing) fail
    # only for the program and module that do not exist here.
    text = EXAMPLE.read_text()
    text = re.sub(
        r"(?m)^# (\[handlers\.[^\]]+\]|\[\[schedules\]\]|\[archive\]|\[tracing\]|[a-z_]+ = .*)$",
        r"\1",
        text,
    )
    problems = problems_of(text)
    assert problems == [
        "handlers.thumbnail.exec: program '/usr/local/bin/make-thumbnail' "
        "not found or not executable",
        "handlers.send-email.python: cannot import module 'myapp.jobs': No module named 'myapp' "
        "(looked in the config file's directory, [workers] python_path, then the packages of "
        "taskd's own Python)",
    ]


# Defaults and the shape of the result


def test_defaults() -> None:
    cfg = parse({"handlers": {"echo": {"builtin": "echo"}}}, env={})
    assert cfg.source == "<config>"
    assert cfg.server == ServerConfig(
        listen="127.0.0.1:7700", max_body=1_048_576, host="127.0.0.1", port=7700, unix_path=None
    )
    assert cfg.redis == RedisConfig(url="embedded", prefix="taskd", data_dir=Path("var"))
    assert cfg.redis.embedded
    assert cfg.workers == WorkersConfig(
        concurrency=100,
        queues=("default",),
        shutdown_timeout=30.0,
        heartbeat_interval=5.0,
        dead_after=30.0,
    )
    assert cfg.retention == RetentionConfig(completed=86400.0, failed=604800.0)
    echo = cfg.handlers["echo"]
    assert echo == HandlerConfig(
        name="echo",
        kind="builtin",
        builtin="echo",
        python=None,
        exec=None,
        http=None,
        queue="default",
        timeout=1800.0,
        concurrency=None,
        max_attempts=3,
        backoff_base=2.0,
        backoff_max=3600.0,
        permanent_exit_codes=(),
        rate_limit=None,
        global_concurrency=None,
        env=(),
        pass_env=(),
    )


def test_result_is_immutable() -> None:
    cfg = parse({"handlers": {"echo": {"builtin": "echo"}}}, env={})
    assert isinstance(cfg.handlers, types.MappingProxyType)
    with pytest.raises(TypeError):
        cfg.handlers["x"] = cfg.handlers["echo"]  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.workers.concurrency = 1  # type: ignore[misc]


def test_every_value_set() -> None:
    cfg = parse_text(
        """
        [server]
        listen = "0.0.0.0:8080"
        max_body = 2048
        [redis]
        url = "rediss://:pw@redis.example.com:6380/2"
        prefix = "taskd.staging"
        data_dir = "/srv/taskd"
        [workers]
        concurrency = 8
        queues = ["default", "images", "mail.v2"]
        shutdown_timeout = 5
        heartbeat_interval = 0.5
        dead_after = 1
        [retention]
        completed = 60
        failed = 315360000
        [handlers."thumb.v2:big"]
        builtin = "sleep"
        queue = "images"
        timeout = 604800
        concurrency = 4
        max_attempts = 1000
        backoff_base = 0.5
        backoff_max = 604800
        """
    )
    assert cfg.server == ServerConfig("0.0.0.0:8080", 2048, "0.0.0.0", 8080, None)
    assert cfg.redis == RedisConfig(
        "rediss://:pw@redis.example.com:6380/2", "taskd.staging", Path("/srv/taskd")
    )
    assert not cfg.redis.embedded
    assert cfg.workers == WorkersConfig(8, ("default", "images", "mail.v2"), 5.0, 0.5, 1.0)
    assert isinstance(cfg.workers.shutdown_timeout, float)
    assert cfg.retention == RetentionConfig(60.0, 315360000.0)
    assert isinstance(cfg.retention.completed, float)
    handler = cfg.handlers["thumb.v2:big"]
    assert (handler.queue, handler.timeout, handler.concurrency) == ("images", 604800.0, 4)
    assert isinstance(handler.timeout, float)
    assert (handler.max_attempts, handler.backoff_base, handler.backoff_max) == (
        1000,
        0.5,
        604800.0,
    )
    assert isinstance(handler.backoff_max, float)


def test_connection_limits() -> None:
    cfg = parse_text(
        "[server]\nkeepalive_timeout = 5\nrequest_read_timeout = 0.5\nmax_connections = 20\n" + ECHO
    )
    assert (cfg.server.keepalive_timeout, cfg.server.request_read_timeout) == (5.0, 0.5)
    assert isinstance(cfg.server.keepalive_timeout, float)
    assert cfg.server.max_connections == 20
    default = ServerConfig()
    assert (default.keepalive_timeout, default.request_read_timeout) == (75.0, 10.0)
    assert default.max_connections == 1000


def test_connection_limits_are_checked_with_a_bad_listen() -> None:
    # A bad listen address must not hide the other problems of [server].
    problems = problems_of('[server]\nlisten = "nowhere"\nmax_connections = 0\n')
    assert [p.split(":")[0] for p in problems] == ["server.max_connections", "server.listen"]


# Each kind of handler


def test_builtin_handlers() -> None:
    for name in config.BUILTINS:
        cfg = parse({"handlers": {"j": {"builtin": name}}}, env={})
        assert cfg.handlers["j"].kind == "builtin"
        assert cfg.handlers["j"].builtin == name


def test_python_handler() -> None:
    cfg = parse({"handlers": {"dump": {"python": "json:dumps"}}}, env={})
    handler = cfg.handlers["dump"]
    assert (handler.kind, handler.python) == ("python", "json:dumps")
    assert (handler.builtin, handler.exec, handler.http) == (None, None, None)


def test_python_handler_in_a_package() -> None:
    cfg = parse({"handlers": {"dump": {"python": "os.path:join"}}}, env={})
    assert cfg.handlers["dump"].python == "os.path:join"


def test_python_handler_dotted_attribute() -> None:
    cfg = parse({"handlers": {"enc": {"python": "json:JSONEncoder.encode"}}}, env={})
    assert cfg.handlers["enc"].python == "json:JSONEncoder.encode"


@pytest.fixture
def import_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """sys.path as it was, and no module of tmp_path left imported, after the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]


def write_module(path: Path, text: str) -> None:
    """A module file, its directories made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(
    ("listen", "address"),
    [
        ("127.0.0.1:6390", ("127.0.0.1", 6390)),
        ("[::1]:6390", ("::1", 6390)),
        ("0.0.0.0:6390", ("0.0.0.0", 6390)),
        ("10.0.0.5:65535", ("10.0.0.5", 65535)),
    ],
)
def test_embedded_listen(listen: str, address: tuple[str, int]) -> None:
    cfg = parse_text(f'[redis]\nembedded_listen = "{listen}"\n\n{ECHO}')
    assert (cfg.redis.embedded_listen, cfg.redis.embedded_address) == (listen, address)
    assert parse_text(ECHO).redis.embedded_address is None


def test_embedded_listen_stays_in_a_file_a_daemon_on_another_redis_shares() -> None:
    # The first daemon's file, used by a second one that names the first's Redis.
    cfg = parse_text(
        f'[redis]\nembedded_listen = "127.0.0.1:6390"\n\n{ECHO}',
        env={"TASKD_REDIS_URL": "redis://:pw@127.0.0.1:6390/0"},
    )
    assert not cfg.redis.embedded


def test_python_handler_in_a_package_beside_the_config_file(
    tmp_path: Path, import_path: None
) -> None:
    # A name of its own: a module another test imported stays in sys.modules.
    write_module(tmp_path / "etc" / "beside_app" / "__init__.py", "")
    write_module(tmp_path / "etc" / "beside_app" / "jobs.py", "def run(job):\n    return 1\n")
    path = tmp_path / "etc" / "taskd.toml"
    path.write_text('[handlers.run]\npython = "beside_app.jobs:run"\n')
    cfg = load(path, env={})
    assert cfg.handlers["run"].python == "beside_app.jobs:run"
    assert sys.path[0] == str(tmp_path / "etc")
    assert config.resolve("beside_app.jobs:run").__module__ == "beside_app.jobs"
    load(path, env={})  # again: the directory is on the path once
    assert sys.path.count(str(tmp_path / "etc")) == 1


def test_python_path_is_taken_from_the_config_files_directory_after_it(
    tmp_path: Path, import_path: None
) -> None:
    etc, elsewhere = tmp_path / "etc", tmp_path / "opt" / "lib"
    write_module(etc / "src" / "pp_first.py", "def run(job):\n    return 'src'\n")
    write_module(elsewhere / "pp_second.py", "def run(job):\n    return 'opt'\n")
    path = etc / "taskd.toml"
    path.write_text(
        f'[workers]\npython_path = ["src", "{elsewhere}"]\n\n'
        '[handlers.a]\npython = "pp_first:run"\n\n[handlers.b]\npython = "pp_second:run"\n'
    )
    cfg = load(path, env={})
    assert cfg.workers.python_path == (etc / "src", elsewhere)
    # As PYTHONPATH would: the config's directory, then python_path, then the rest.
    assert sys.path[:3] == [str(etc), str(etc / "src"), str(elsewhere)]


def test_python_path_without_a_config_file_is_taken_from_the_working_directory(
    tmp_path: Path, import_path: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lib").mkdir()
    cfg = parse({"workers": {"python_path": ["lib"]}, "handlers": {"e": {"builtin": "echo"}}})
    assert cfg.workers.python_path == (tmp_path / "lib",)


def test_python_path_names_directories_that_exist(tmp_path: Path, import_path: None) -> None:
    (tmp_path / "file").write_text("")
    path = tmp_path / "taskd.toml"
    path.write_text(f'[workers]\npython_path = ["nope", "{tmp_path / "file"}", 3]\n\n{ECHO}')
    with pytest.raises(ConfigError) as info:
        load(path, env={})
    assert info.value.problems == [
        "workers.python_path[2]: must be a non-empty string, got integer 3"
    ]
    path.write_text(f'[workers]\npython_path = ["nope", "{tmp_path / "file"}"]\n\n{ECHO}')
    with pytest.raises(ConfigError) as info:
        load(path, env={})
    assert info.value.problems == [
        f"workers.python_path[0]: no such directory: {tmp_path / 'nope'} (from 'nope')",
        f"workers.python_path[1]: no such directory: '{tmp_path / 'file'}'",
    ]


def test_a_module_the_handler_imports_is_told_apart_from_the_handlers_own(
    tmp_path: Path, import_path: None
) -> None:
    write_module(tmp_path / "needs_dep.py", "import no_such_dependency_xyz\n")
    path = tmp_path / "taskd.toml"
    path.write_text(
        '[handlers.a]\npython = "needs_dep:run"\n\n[handlers.b]\npython = "not_here_xyz.jobs:run"\n'
    )
    with pytest.raises(ConfigError) as info:
        load(path, env={})
    assert str(info.value).splitlines() == [
        f"{path}: handlers.a.python: cannot import module 'needs_dep': No module named "
        "'no_such_dependency_xyz' (a module the handler imports: install it into taskd's own "
        "Python)",
        f"{path}: handlers.b.python: cannot import module 'not_here_xyz.jobs': No module named "
        "'not_here_xyz' (looked in the config file's directory, [workers] python_path, then "
        "the packages of taskd's own Python)",
    ]


def test_exec_handler_absolute_path() -> None:
    cfg = parse({"handlers": {"run": {"exec": [sys.executable, "-c", "pass"]}}}, env={})
    handler = cfg.handlers["run"]
    assert handler.kind == "exec"
    assert handler.exec == (sys.executable, "-c", "pass")


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs sh on PATH")
def test_exec_handler_name_on_path() -> None:
    cfg = parse({"handlers": {"run": {"exec": ["sh", "-c", "true"]}}}, env={})
    assert cfg.handlers["run"].exec == ("sh", "-c", "true")


def test_http_handler() -> None:
    cfg = parse({"handlers": {"hook": {"http": "https://hooks.example.com:8443/x"}}}, env={})
    handler = cfg.handlers["hook"]
    assert (handler.kind, handler.http) == ("http", "https://hooks.example.com:8443/x")


def test_http_handler_max_redirects() -> None:
    cfg = parse_text(
        '[handlers.a]\nhttp = "http://h/"\n[handlers.b]\nhttp = "http://h/"\nmax_redirects = 0\n'
    )
    assert (cfg.handlers["a"].max_redirects, cfg.handlers["b"].max_redirects) == (3, 0)


def test_callbacks_allow_and_deny() -> None:
    cfg = parse_text(
        '[callbacks]\nallow = ["10.1.2.3/8", "fd00::/8", "192.168.1.7"]\n'
        'deny = ["203.0.113.0/24"]\n' + ECHO
    )
    net = ipaddress.ip_network
    # An address with host bits set names its network, as ip_network(strict=False) reads it.
    assert cfg.callbacks.allow == (net("10.0.0.0/8"), net("fd00::/8"), net("192.168.1.7/32"))
    assert cfg.callbacks.deny == (net("203.0.113.0/24"),)


def test_callbacks_default_to_empty_lists() -> None:
    assert parse_text(ECHO).callbacks == CallbacksConfig(allow=(), deny=())


def test_every_bad_network_is_reported() -> None:
    problems = problems_of('[callbacks]\nallow = ["10/8", "ok"]\ndeny = ["::1/200"]\n')
    assert [p.split(":")[0] for p in problems] == [
        "callbacks.allow[0]",
        "callbacks.allow[1]",
        "callbacks.deny[0]",
    ]


def test_handler_queue_need_not_be_served_here() -> None:
    cfg = parse_text('[handlers.t]\nbuiltin = "noop"\nqueue = "elsewhere"\n')
    assert cfg.handlers["t"].queue == "elsewhere"
    assert cfg.workers.queues == ("default",)


# Limits across daemons


@pytest.mark.parametrize(
    ("text", "count", "per_ms"),
    [
        ("100/s", 100, 1000),
        ("1/s", 1, 1000),
        ("30/m", 30, 60_000),
        ("1000000/h", 1_000_000, 3_600_000),
        ("007/s", 7, 1000),
    ],
)
def test_rate_limit(text: str, count: int, per_ms: int) -> None:
    cfg = parse({"handlers": {"r": {"builtin": "noop", "rate_limit": text}}}, env={})
    limit = cfg.handlers["r"].rate_limit
    assert limit == RateLimit(count=count, per_ms=per_ms)
    assert str(limit) == text.lstrip("0")


def test_rate_limit_str_of_an_odd_window() -> None:
    assert str(RateLimit(5, 250)) == "5/250ms"


def test_global_concurrency_and_concurrency_together() -> None:
    spec = {"builtin": "sleep", "concurrency": 4, "global_concurrency": 100_000}
    handler = parse({"handlers": {"s": spec}}, env={}).handlers["s"]
    assert (handler.concurrency, handler.global_concurrency) == (4, 100_000)
    assert handler.rate_limit is None


def test_schedule_priority() -> None:
    cfg = parse_text(
        ECHO + '[[schedules]]\nname = "hot"\ncron = "@hourly"\ntype = "echo"\npriority = 9\n'
        '[[schedules]]\nname = "cold"\ncron = "@daily"\ntype = "echo"\npriority = 0\n'
        '[[schedules]]\nname = "plain"\ncron = "@daily"\ntype = "echo"\n'
    )
    assert [s.priority for s in cfg.schedules] == [9, 0, None]


# Retries and retention


def test_exec_permanent_exit_codes() -> None:
    spec = {"exec": [sys.executable], "permanent_exit_codes": [65, 1, 255]}
    cfg = parse({"handlers": {"run": spec}}, env={})
    assert cfg.handlers["run"].permanent_exit_codes == (65, 1, 255)


def test_exec_empty_permanent_exit_codes() -> None:
    spec = {"exec": [sys.executable], "permanent_exit_codes": []}
    cfg = parse({"handlers": {"run": spec}}, env={})
    assert cfg.handlers["run"].permanent_exit_codes == ()


def test_every_bad_exit_code_is_reported() -> None:
    problems = problems_of(
        f'[handlers.x]\nexec = ["{sys.executable}"]\npermanent_exit_codes = [0, 65, "x", 300]\n'
    )
    assert problems == [
        "handlers.x.permanent_exit_codes[0]: must be an integer from 1 to 255, got 0",
        "handlers.x.permanent_exit_codes[2]: must be an integer, got string 'x'",
        "handlers.x.permanent_exit_codes[3]: must be an integer from 1 to 255, got 300",
    ]


def test_exit_codes_without_a_kind_report_only_the_missing_kind() -> None:
    problems = problems_of("[handlers.x]\npermanent_exit_codes = [65]\n")
    assert problems == ["handlers.x: give exactly one of builtin, python, exec, http (got none)"]


def test_exit_codes_with_exec_among_two_kinds_report_only_the_two_kinds() -> None:
    problems = problems_of(
        f'[handlers.x]\nexec = ["{sys.executable}"]\nhttp = "http://h/"\n'
        "permanent_exit_codes = [65]\n"
    )
    assert problems == [
        "handlers.x: give exactly one of builtin, python, exec, http (got exec and http)"
    ]


# The environment of an exec handler's program

EXEC = f'[handlers.x]\nexec = ["{sys.executable}"]\n'


def test_exec_env_and_pass_env() -> None:
    handler = parse_text(
        EXEC + 'env = { A = "1", lower_case = "", "_X9" = "a=b c" }\n'
        'pass_env = ["SECRET_TOKEN", "http_proxy"]\n'
    ).handlers["x"]
    assert handler.env == (("A", "1"), ("lower_case", ""), ("_X9", "a=b c"))
    assert handler.pass_env == ("SECRET_TOKEN", "http_proxy")


def test_exec_empty_env_and_pass_env() -> None:
    handler = parse_text(EXEC + "env = {}\npass_env = []\n").handlers["x"]
    assert (handler.env, handler.pass_env) == ((), ())


def test_exec_program_is_looked_up_on_the_path_env_sets(tmp_path: Path) -> None:
    # The program will run with env.PATH, so that is where it must be found.
    script = tmp_path / "only-here"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    text = f'[handlers.x]\nexec = ["only-here"]\nenv = {{ PATH = "{tmp_path}" }}\n'
    assert parse_text(text).handlers["x"].exec == ("only-here",)
    assert problems_of('[handlers.x]\nexec = ["sh"]\nenv = { PATH = "/nonexistent" }\n') == [
        "handlers.x.exec: program 'sh' not found on handlers.x.env.PATH"
    ]


RESERVED = (
    "names are taskd's (the job's variables cannot be overridden, the daemon's are not passed on)"
)
NAME_RULE = "use letters, digits and '_', not starting with a digit"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            'env = { "1A" = "x" }',
            f"handlers.x.env.1A: invalid environment variable name '1A': {NAME_RULE}",
        ),
        (
            'env = { "A-B" = "x" }',
            f"handlers.x.env.A-B: invalid environment variable name 'A-B': {NAME_RULE}",
        ),
        (
            'env = { "A B" = "x" }',
            f"handlers.x.env.\"A B\": invalid environment variable name 'A B': {NAME_RULE}",
        ),
        (
            'env = { "" = "x" }',
            f"handlers.x.env.\"\": invalid environment variable name '': {NAME_RULE}",
        ),
        (
            'env = { "É" = "x" }',
            f"handlers.x.env.\"É\": invalid environment variable name 'É': {NAME_RULE}",
        ),
        ("env = { A = 1 }", "handlers.x.env.A: must be a string, got integer 1"),
        ("env = { A = true }", "handlers.x.env.A: must be a string, got boolean true"),
        ('env = { A = ["x"] }', "handlers.x.env.A: must be a string, got array"),
        ('env = { A = { B = "x" } }', "handlers.x.env.A: must be a string, got table"),
        # The value is not shown: it may be a secret.
        ('env = { A = "se\\u0000cret" }', "handlers.x.env.A: must not contain a NUL byte"),
        ('env = ["A=1"]', "handlers.x.env: must be a table, got array"),
        ('env = "A=1"', "handlers.x.env: must be a table, got string 'A=1'"),
        (
            'env = { TASKD_JOB_ID = "x" }',
            f"handlers.x.env.TASKD_JOB_ID: reserved name 'TASKD_JOB_ID': TASKD_* {RESERVED}",
        ),
        (
            'env = { TASKD_ANYTHING = "x" }',
            f"handlers.x.env.TASKD_ANYTHING: reserved name 'TASKD_ANYTHING': TASKD_* {RESERVED}",
        ),
        (
            'pass_env = "HOME"',
            "handlers.x.pass_env: must be an array of variable names, got string 'HOME'",
        ),
        (
            'pass_env = { A = "1" }',
            "handlers.x.pass_env: must be an array of variable names, got table",
        ),
        ("pass_env = [1]", "handlers.x.pass_env[0]: must be a string, got integer 1"),
        (
            'pass_env = ["A", "1A"]',
            f"handlers.x.pass_env[1]: invalid environment variable name '1A': {NAME_RULE}",
        ),
        (
            'pass_env = [""]',
            f"handlers.x.pass_env[0]: invalid environment variable name '': {NAME_RULE}",
        ),
        ('pass_env = ["A", "B", "A"]', "handlers.x.pass_env[2]: duplicate name 'A'"),
        (
            'pass_env = ["TASKD_REDIS_URL"]',
            f"handlers.x.pass_env[0]: reserved name 'TASKD_REDIS_URL': TASKD_* {RESERVED}",
        ),
    ],
)
def test_bad_exec_environment(text: str, expected: str) -> None:
    assert problems_of(EXEC + text + "\n") == [expected]


@pytest.mark.parametrize("key", ["env", "pass_env"])
@pytest.mark.parametrize(
    "kind", ['builtin = "echo"', 'python = "json:dumps"', 'http = "http://h/"']
)
def test_environment_only_on_exec_handlers(kind: str, key: str) -> None:
    value = '{ A = "1" }' if key == "env" else '["A"]'
    problems = problems_of(f"[handlers.x]\n{kind}\n{key} = {value}\n")
    assert problems == [f"handlers.x.{key}: only exec handlers run a program with an environment"]


def test_environment_without_a_kind_reports_only_the_missing_kind() -> None:
    problems = problems_of('[handlers.x]\nenv = { A = "1" }\npass_env = ["B"]\n')
    assert problems == ["handlers.x: give exactly one of builtin, python, exec, http (got none)"]


def test_every_bad_environment_setting_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "taskd.toml"
    path.write_text(
        EXEC + 'env = { A = 1, "2B" = "x", TASKD_QUEUE = "q", OK = "fine" }\n'
        'pass_env = ["HOME", 7, "HOME"]\n'
        '[handlers.y]\nbuiltin = "echo"\nenv = { A = "1" }\n'
    )
    with pytest.raises(ConfigError) as info:
        load(path, env={})
    assert str(info.value).splitlines() == [
        f"{path}: handlers.x.env.A: must be a string, got integer 1",
        f"{path}: handlers.x.env.2B: invalid environment variable name '2B': {NAME_RULE}",
        f"{path}: handlers.x.env.TASKD_QUEUE: reserved name 'TASKD_QUEUE': TASKD_* {RESERVED}",
        f"{path}: handlers.x.pass_env[1]: must be a string, got integer 7",
        f"{path}: handlers.x.pass_env[2]: duplicate name 'HOME'",
        f"{path}: handlers.y.env: only exec handlers run a program with an environment",
    ]


def test_backoff_max_may_equal_backoff_base() -> None:
    cfg = parse_text('[handlers.x]\nbuiltin = "fail"\nbackoff_base = 30\nbackoff_max = 30\n')
    handler = cfg.handlers["x"]
    assert (handler.backoff_base, handler.backoff_max) == (30.0, 30.0)


def test_bad_backoff_base_is_not_compared_with_backoff_max() -> None:
    # One mistake, one message: the base that was refused is not also "above the max".
    problems = problems_of('[handlers.x]\nbuiltin = "fail"\nbackoff_base = -1\nbackoff_max = 1\n')
    assert problems == [
        "handlers.x.backoff_base: must be a number of seconds greater than 0, got -1"
    ]


def test_retention_alone() -> None:
    cfg = parse_text("[retention]\nfailed = 3600\n" + ECHO)
    assert cfg.retention == RetentionConfig(completed=86400.0, failed=3600.0)


def test_config_without_retention_gets_the_default() -> None:
    # Code that builds a Config by hand, as before retention existed, still works.
    cfg = Config(ServerConfig(), RedisConfig(), WorkersConfig(), {})
    assert cfg.retention == RetentionConfig()
    assert cfg.source == "<config>"


# TASKD_REDIS_URL


def test_env_overrides_redis_url() -> None:
    text = '[redis]\nurl = "redis://file:6379/0"\n' + ECHO
    cfg = parse_text(text, env={"TASKD_REDIS_URL": "redis://env:6379/1"})
    assert cfg.redis.url == "redis://env:6379/1"
    assert not cfg.redis.embedded


def test_empty_env_does_not_override() -> None:
    cfg = parse_text('[redis]\nurl = "redis://file:6379/0"\n' + ECHO, env={"TASKD_REDIS_URL": ""})
    assert cfg.redis.url == "redis://file:6379/0"


def test_env_override_is_validated() -> None:
    with pytest.raises(ConfigError) as info:
        parse_text(ECHO, env={"TASKD_REDIS_URL": "http://nope"})
    assert info.value.problems == [
        'redis.url (from TASKD_REDIS_URL): must be "embedded" or a redis://, rediss:// '
        "or unix:// URL, got 'http://nope'"
    ]


def test_load_passes_env(tmp_path: Path) -> None:
    path = tmp_path / "taskd.toml"
    path.write_text(ECHO)
    cfg = load(path, env={"TASKD_REDIS_URL": "unix:///run/redis.sock"})
    assert cfg.redis.url == "unix:///run/redis.sock"


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKD_REDIS_URL", "redis://from-environ:6379/0")
    cfg = parse({"handlers": {"echo": {"builtin": "echo"}}})
    assert cfg.redis.url == "redis://from-environ:6379/0"


# [server] signing_secrets and TASKD_SIGNING_SECRETS

KEY_A, KEY_B = b"a" * 32, bytes(range(24))
SECRET_A = "whsec_" + base64.b64encode(KEY_A).decode()
SECRET_B = "whsec_" + base64.b64encode(KEY_B).decode()
SHORT = "whsec_" + base64.b64encode(b"s" * 23).decode()


def secrets_text(*secrets: str) -> str:
    return f"[server]\nsigning_secrets = {json.dumps(list(secrets))}\n" + ECHO


def test_signing_secrets_are_decoded_in_order_and_none_by_default() -> None:
    cfg = parse_text(secrets_text(SECRET_A, SECRET_B))
    assert [s.key for s in cfg.server.signing_secrets] == [KEY_A, KEY_B]
    assert parse_text(ECHO).server.signing_secrets == ()
    # Unpadded base64, as the standardwebhooks libraries accept it.
    [unpadded] = parse_text(secrets_text(SECRET_B.rstrip("="))).server.signing_secrets
    assert unpadded.key == KEY_B


def test_env_signing_secrets_replace_the_files() -> None:
    env = {"TASKD_SIGNING_SECRETS": f" {SECRET_B},{SECRET_A}\n"}
    cfg = parse_text(secrets_text(SECRET_A), env=env)
    assert [s.key for s in cfg.server.signing_secrets] == [KEY_B, KEY_A]
    spaced = parse_text(ECHO, env={"TASKD_SIGNING_SECRETS": f"{SECRET_A} {SECRET_B}"})
    assert [s.key for s in spaced.server.signing_secrets] == [KEY_A, KEY_B]
    unset = parse_text(secrets_text(SECRET_A), env={"TASKD_SIGNING_SECRETS": " "})
    assert [s.key for s in unset.server.signing_secrets] == [KEY_A]


BASE64 = 'the part after "whsec_" must be base64'
BAD_SECRETS = [
    ("not-whsec", 'must start with "whsec_"'),
    ("whsec_***", BASE64),
    ("whsec_" + base64.urlsafe_b64encode(b"\xfb" * 30).decode(), BASE64),
    (SHORT, "must encode at least 24 bytes, got 23"),
]


@pytest.mark.parametrize(("secret", "expected"), BAD_SECRETS)
def test_a_bad_signing_secret_is_named_by_its_place_and_never_shown(
    secret: str, expected: str
) -> None:
    [problem] = problems_of(secrets_text(SECRET_A, secret))
    assert problem.startswith(f"server.signing_secrets[1]: {expected}")
    with pytest.raises(ConfigError) as info:
        parse_text(ECHO, env={"TASKD_SIGNING_SECRETS": f"{SECRET_A} {secret}"})
    [from_env] = info.value.problems
    assert from_env.startswith(
        f"server.signing_secrets[1] (from TASKD_SIGNING_SECRETS): {expected}"
    )
    for shown in (problem, from_env):
        assert secret.removeprefix("whsec_") not in shown
        assert SECRET_A.removeprefix("whsec_") not in shown


def test_signing_secrets_of_the_wrong_shape() -> None:
    assert problems_of(secrets_text(SECRET_A, SECRET_A)) == [
        "server.signing_secrets[1]: repeats signing_secrets[0]"
    ]
    assert problems_of(f"[server]\nsigning_secrets = [{SECRET_A!r}, 7]\n") == [
        "server.signing_secrets[1]: must be a string, got integer 7"
    ]
    # A secret given where the array belongs is not quoted back.
    [problem] = problems_of(f"[server]\nsigning_secrets = {SECRET_A!r}\n")
    assert problem == (
        'server.signing_secrets: must be an array of strings "whsec_" followed by the base64 '
        "of 24 or more random bytes, got a string"
    )


def test_file_and_env_signing_secrets_are_both_checked() -> None:
    with pytest.raises(ConfigError) as info:
        parse_text(secrets_text("nope"), env={"TASKD_SIGNING_SECRETS": SHORT})
    assert [p.partition(":")[0] for p in info.value.problems] == [
        "server.signing_secrets[0]",
        "server.signing_secrets[0] (from TASKD_SIGNING_SECRETS)",
    ]


def test_a_printed_config_shows_no_signing_key() -> None:
    cfg = parse_text(secrets_text(SECRET_A, SECRET_B))
    for shown in (repr(cfg), str(cfg), repr(cfg.server)):
        assert "SigningSecret()" in shown
        for secret, key in ((SECRET_A, KEY_A), (SECRET_B, KEY_B)):
            assert secret.removeprefix("whsec_") not in shown
            assert repr(key) not in shown


def test_taskd_check_reports_a_bad_secret_without_it(tmp_path: Path) -> None:
    path = tmp_path / "taskd.toml"
    path.write_text(secrets_text(SECRET_A, "whsec_" + "Zm9v" * 3))
    taskd = Path(sys.executable).parent / "taskd"
    env = {**os.environ, "TASKD_SIGNING_SECRETS": ""}
    run = subprocess.run(
        [str(taskd), "check", "--config", str(path)], capture_output=True, text=True, env=env
    )
    assert run.returncode == 2
    assert run.stderr.splitlines()[1:] == [
        f"{path}: server.signing_secrets[1]: must encode at least 24 bytes, got 9 (value not shown)"
    ]
    assert "Zm9v" not in run.stderr + run.stdout
    path.write_text(secrets_text(SECRET_A))
    ok = subprocess.run(
        [str(taskd), "check", "--config", str(path)], capture_output=True, text=True, env=env
    )
    assert (ok.returncode, ok.stdout.strip()) == (0, f"{path}: ok (1 handler)")
    assert SECRET_A.removeprefix("whsec_") not in ok.stdout + ok.stderr


# Every validation rule, with the key path it is reported under

INVALID = [
    # server
    ("[server]\nlisten = 7700\n", "server.listen: must be a string, got integer 7700"),
    ('[server]\nlisten = "7700"\n', "server.listen: expected host:port or unix:/path, got '7700'"),
    ('[server]\nlisten = "::1:7700"\n', "server.listen: expected host:port or unix:/path"),
    ('[server]\nlisten = ":7700"\n', "server.listen: expected host:port or unix:/path"),
    ('[server]\nlisten = "host:"\n', "server.listen: expected host:port or unix:/path"),
    ('[server]\nlisten = "host:http"\n', "server.listen: expected host:port or unix:/path"),
    ('[server]\nlisten = "bad host:80"\n', "server.listen: expected host:port or unix:/path"),
    ('[server]\nlisten = "[nothost]:80"\n', "server.listen: expected host:port or unix:/path"),
    ('[server]\nlisten = "h:70000"\n', "server.listen: port must be from 0 to 65535"),
    ('[server]\nlisten = "unix:x.sock"\n', "server.listen: unix socket path must be absolute"),
    ("[server]\nmax_body = 0\n", "server.max_body: must be an integer from 1 to 1073741824, got 0"),
    ("[server]\nmax_body = 1073741825\n", "server.max_body: must be an integer from 1 to"),
    ("[server]\nmax_body = 1.5\n", "server.max_body: must be an integer, got float 1.5"),
    (
        "[server]\nkeepalive_timeout = 0\n",
        "server.keepalive_timeout: must be a number of seconds greater than 0 and at most "
        "3600, got 0",
    ),
    ("[server]\nkeepalive_timeout = 75000\n", "server.keepalive_timeout: must be a number of"),
    (
        '[server]\nkeepalive_timeout = "75s"\n',
        "server.keepalive_timeout: must be a number of seconds, got string '75s'",
    ),
    (
        "[server]\nrequest_read_timeout = -1\n",
        "server.request_read_timeout: must be a number of seconds greater than 0 and at most "
        "3600, got -1",
    ),
    ("[server]\nrequest_read_timeout = nan\n", "server.request_read_timeout: must be a number"),
    (
        "[server]\nrequest_read_timeout = true\n",
        "server.request_read_timeout: must be a number of seconds, got boolean true",
    ),
    (
        "[server]\nmax_connections = 0\n",
        "server.max_connections: must be an integer from 1 to 1000000, got 0",
    ),
    ("[server]\nmax_connections = 1000001\n", "server.max_connections: must be an integer from"),
    ("[server]\nmax_connections = 10.5\n", "server.max_connections: must be an integer, got"),
    (
        '[server]\nmax_connections = "1000"\n',
        "server.max_connections: must be an integer, got string '1000'",
    ),
    # redis
    ('[redis]\nurl = "localhost:6379"\n', 'redis.url: must be "embedded" or a redis://'),
    ('[redis]\nurl = "redis:///0"\n', "redis.url: a redis:// URL needs a host"),
    ('[redis]\nurl = "rediss://"\n', "redis.url: a rediss:// URL needs a host"),
    ('[redis]\nurl = "redis://h:port/0"\n', "redis.url: invalid URL 'redis://h:port/0'"),
    ('[redis]\nurl = "redis://h:6379/db"\n', "redis.url: the database must be a number"),
    ('[redis]\nurl = "unix://"\n', "redis.url: a unix:// URL needs a socket path"),
    ("[redis]\nurl = []\n", "redis.url: must be a string, got array"),
    ('[redis]\nprefix = ""\n', "redis.prefix: must be 1-64 letters"),
    ('[redis]\nprefix = "a{b}"\n', "redis.prefix: must be 1-64 letters"),
    ('[redis]\nprefix = "a:b"\n', "redis.prefix: must be 1-64 letters"),
    (f'[redis]\nprefix = "{"p" * 65}"\n', "redis.prefix: must be 1-64 letters"),
    ('[redis]\ndata_dir = ""\n', "redis.data_dir: must not be empty"),
    ("[redis]\ndata_dir = 1\n", "redis.data_dir: must be a string, got integer 1"),
    ('[redis]\ncluster = "yes"\n', "redis.cluster: must be true or false, got string 'yes'"),
    (
        "[redis]\ncluster = true\n",
        "redis.cluster: a Redis Cluster needs the redis:// or rediss:// url of a node, "
        "got 'embedded'",
    ),
    (
        '[redis]\nurl = "redis://h:6379/2"\ncluster = true\n',
        "redis.cluster: a Redis Cluster has only database 0, got 'redis://h:6379/2'",
    ),
    (
        '[redis]\nembedded_listen = "localhost:6390"\n',
        'redis.embedded_listen: must be "ADDRESS:PORT" with an IP address, e.g. '
        '"127.0.0.1:6390" or "[::1]:6390", got \'localhost:6390\'',
    ),
    ('[redis]\nembedded_listen = "::1:6390"\n', 'redis.embedded_listen: must be "ADDRESS:PORT"'),
    ('[redis]\nembedded_listen = "127.0.0.1"\n', 'redis.embedded_listen: must be "ADDRESS:PORT"'),
    ('[redis]\nembedded_listen = "unix:/r.sock"\n', "redis.embedded_listen: must be"),
    ('[redis]\nembedded_listen = "10.0.0.1:65536"\n', "redis.embedded_listen: must be"),
    (
        '[redis]\nembedded_listen = "127.0.0.1:0"\n',
        "redis.embedded_listen: port must be from 1 to 65535, got '127.0.0.1:0'",
    ),
    ("[redis]\nembedded_listen = 6390\n", "redis.embedded_listen: must be a string, got integer"),
    (
        '[redis]\nurl = "redis://h:6379/0"\nembedded_listen = "127.0.0.1:6390"\n',
        'redis.embedded_listen: only an embedded Redis (url = "embedded") is started here',
    ),
    # workers
    ("[workers]\nconcurrency = 0\n", "workers.concurrency: must be an integer from 1 to 100000"),
    ("[workers]\nconcurrency = 100001\n", "workers.concurrency: must be an integer from 1 to"),
    (
        '[workers]\nconcurrency = "ten"\n',
        "workers.concurrency: must be an integer, got string 'ten'",
    ),
    ("[workers]\nqueues = []\n", "workers.queues: must be a non-empty array of queue names"),
    ('[workers]\nqueues = "default"\n', "workers.queues: must be a non-empty array"),
    (
        '[workers]\nqueues = ["a", 3]\n',
        "workers.queues[1]: must be a non-empty string, got integer",
    ),
    ('[workers]\nqueues = ["a", ""]\n', "workers.queues[1]: must be a non-empty string"),
    ('[workers]\nqueues = ["a b"]\n', "workers.queues[0]: invalid queue name 'a b'"),
    ('[workers]\nqueues = ["{tag}"]\n', "workers.queues[0]: invalid queue name '{tag}'"),
    ('[workers]\nqueues = ["a:b"]\n', "workers.queues[0]: invalid queue name 'a:b'"),
    ('[workers]\nqueues = ["-a"]\n', "workers.queues[0]: invalid queue name '-a'"),
    (f'[workers]\nqueues = ["{"q" * 65}"]\n', "workers.queues[0]: invalid queue name"),
    ('[workers]\nqueues = ["a", "b", "a"]\n', "workers.queues[2]: duplicate queue name 'a'"),
    ("[workers]\nshutdown_timeout = 0\n", "workers.shutdown_timeout: must be a number of seconds"),
    ("[workers]\nshutdown_timeout = -1.5\n", "workers.shutdown_timeout: must be a number of"),
    ("[workers]\nshutdown_timeout = inf\n", "workers.shutdown_timeout: must be a number of"),
    ("[workers]\nshutdown_timeout = nan\n", "workers.shutdown_timeout: must be a number of"),
    (
        '[workers]\nshutdown_timeout = "30s"\n',
        "workers.shutdown_timeout: must be a number of seconds, got string '30s'",
    ),
    ("[workers]\nheartbeat_interval = 0\n", "workers.heartbeat_interval: must be a number of"),
    ("[workers]\ndead_after = 0\n", "workers.dead_after: must be a number of seconds"),
    (
        "[workers]\nheartbeat_interval = 10\ndead_after = 15\n",
        "workers.dead_after: must be at least 2 x workers.heartbeat_interval (20), got 15",
    ),
    (
        "[workers]\ndead_after = 9.5\n",
        "workers.dead_after: must be at least 2 x workers.heartbeat_interval (10), got 9.5",
    ),
    # handlers: presence, names, kinds
    (
        "[handlers]\n",
        'handlers: at least one handler is required, e.g. [handlers.echo] builtin = "echo"',
    ),
    ('handlers = "echo"\n', "handlers: must be a table, got string 'echo'"),
    ('[handlers]\necho = "echo"\n', "handlers.echo: must be a table, got string 'echo'"),
    ('[handlers."a b"]\nbuiltin = "echo"\n', 'handlers."a b": invalid handler name'),
    ('[handlers."-x"]\nbuiltin = "echo"\n', "handlers.-x: invalid handler name"),
    (f'[handlers.{"h" * 129}]\nbuiltin = "echo"\n', "invalid handler name"),
    ("[handlers.x]\n", "handlers.x: give exactly one of builtin, python, exec, http (got none)"),
    ('[handlers.x]\nqueue = "default"\n', "handlers.x: give exactly one of builtin, python"),
    (
        '[handlers.x]\nbuiltin = "echo"\nhttp = "http://h/"\n',
        "handlers.x: give exactly one of builtin, python, exec, http (got builtin and http)",
    ),
    # builtin
    (
        '[handlers.x]\nbuiltin = "shout"\n',
        "handlers.x.builtin: unknown builtin 'shout' (known: echo",
    ),
    ("[handlers.x]\nbuiltin = true\n", "handlers.x.builtin: must be a string, got boolean true"),
    # python
    (
        '[handlers.x]\npython = "json"\n',
        "handlers.x.python: must look like 'package.module:function'",
    ),
    ('[handlers.x]\npython = "json:"\n', "handlers.x.python: must look like"),
    ('[handlers.x]\npython = "json:a..b"\n', "handlers.x.python: must look like"),
    (
        '[handlers.x]\npython = "json:a.b"\n',
        "handlers.x.python: module 'json' has no callable 'a.b'",
    ),
    ('[handlers.x]\npython = "1json:dumps"\n', "handlers.x.python: must look like"),
    (
        '[handlers.x]\npython = "no_such_module_xyz:f"\n',
        "handlers.x.python: cannot import module 'no_such_module_xyz': "
        "No module named 'no_such_module_xyz'",
    ),
    (
        '[handlers.x]\npython = "json:nope"\n',
        "handlers.x.python: module 'json' has no callable 'nope'",
    ),
    (
        '[handlers.x]\npython = "json:__name__"\n',
        "handlers.x.python: module 'json' has no callable",
    ),
    # exec
    ("[handlers.x]\nexec = []\n", "handlers.x.exec: must be a non-empty array of strings"),
    ('[handlers.x]\nexec = "/bin/true"\n', "handlers.x.exec: must be a non-empty array of strings"),
    ('[handlers.x]\nexec = ["/bin/sh", ""]\n', "handlers.x.exec[1]: must be a non-empty string"),
    ('[handlers.x]\nexec = ["/bin/sh", 1]\n', "handlers.x.exec[1]: must be a non-empty string"),
    (
        '[handlers.x]\nexec = ["/nonexistent/prog"]\n',
        "handlers.x.exec: program '/nonexistent/prog' not found or not executable",
    ),
    (
        '[handlers.x]\nexec = ["no-such-program-xyz"]\n',
        "handlers.x.exec: program 'no-such-program-xyz' not found or not executable",
    ),
    ('[handlers.x]\nexec = ["./run.sh"]\n', "handlers.x.exec: program must be an absolute path"),
    ('[handlers.x]\nexec = ["/"]\n', "handlers.x.exec: program '/' not found or not executable"),
    # http
    ('[handlers.x]\nhttp = "ftp://h/x"\n', "handlers.x.http: must be an http:// or https:// URL"),
    ('[handlers.x]\nhttp = "https:///x"\n', "handlers.x.http: must be an http:// or https:// URL"),
    ('[handlers.x]\nhttp = "example.com/x"\n', "handlers.x.http: must be an http:// or https://"),
    ('[handlers.x]\nhttp = "http://h:port/x"\n', "handlers.x.http: must be an http:// or https://"),
    # common handler keys
    (
        '[handlers.x]\nbuiltin = "echo"\nqueue = "a b"\n',
        "handlers.x.queue: invalid queue name 'a b'",
    ),
    (
        '[handlers.x]\nbuiltin = "echo"\nqueue = 1\n',
        "handlers.x.queue: must be a string, got integer",
    ),
    (
        '[handlers.x]\nbuiltin = "echo"\ntimeout = 0\n',
        "handlers.x.timeout: must be a number of seconds",
    ),
    (
        '[handlers.x]\nbuiltin = "echo"\ntimeout = 604801\n',
        "handlers.x.timeout: must be a number of seconds greater than 0 and at most 604800, "
        "got 604801",
    ),
    (
        '[handlers.x]\nbuiltin = "echo"\nconcurrency = 0\n',
        "handlers.x.concurrency: must be an integer of at least 1, got 0",
    ),
    (
        '[handlers."a.b"]\nbuiltin = "echo"\nconcurrency = 0\n',
        'handlers."a.b".concurrency: must be an integer of at least 1, got 0',
    ),
    # retries
    (
        '[handlers.x]\nbuiltin = "echo"\nmax_attempts = 0\n',
        "handlers.x.max_attempts: must be an integer from 1 to 1000, got 0",
    ),
    (
        '[handlers.x]\nbuiltin = "echo"\nmax_attempts = 1001\n',
        "handlers.x.max_attempts: must be an integer from 1 to 1000, got 1001",
    ),
    (
        '[handlers.x]\nbuiltin = "echo"\nmax_attempts = 2.5\n',
        "handlers.x.max_attempts: must be an integer, got float 2.5",
    ),
    (
        '[handlers.x]\nbuiltin = "echo"\nbackoff_base = 0\n',
        "handlers.x.backoff_base: must be a number of seconds greater than 0, got 0",
    ),
    (
        '[handlers.x]\nbuiltin = "echo"\nbackoff_base = -2.0\n',
        "handlers.x.backoff_base: must be a number of seconds greater than 0, got -2.0",
    ),
    (
        '[handlers.x]\nbuiltin = "echo"\nbackoff_base = inf\n',
        "handlers.x.backoff_base: must be a number of seconds greater than 0, got inf",
    ),
    (
        '[handlers.x]\nbuiltin = "echo"\nbackoff_base = "2s"\n',
        "handlers.x.backoff_base: must be a number of seconds, got string '2s'",
    ),
    (
        '[handlers.x]\nbuiltin = "echo"\nbackoff_max = 0\n',
        "handlers.x.backoff_max: must be a number of seconds greater than 0 and at most 604800, "
        "got 0",
    ),
    (
        '[handlers.x]\nbuiltin = "echo"\nbackoff_max = 604801\n',
        "handlers.x.backoff_max: must be a number of seconds greater than 0 and at most 604800, "
        "got 604801",
    ),
    (
        '[handlers.x]\nbuiltin = "echo"\nbackoff_base = 60\nbackoff_max = 30\n',
        "handlers.x.backoff_max: must be at least handlers.x.backoff_base (60), got 30",
    ),
    (
        '[handlers.x]\nbuiltin = "echo"\nbackoff_base = 7200\n',
        "handlers.x.backoff_max: must be at least handlers.x.backoff_base (7200), got 3600",
    ),
    (
        '[handlers."a.b"]\nbuiltin = "echo"\nbackoff_base = 2.5\nbackoff_max = 1.5\n',
        'handlers."a.b".backoff_max: must be at least handlers."a.b".backoff_base (2.5), got 1.5',
    ),
    # permanent_exit_codes
    (
        '[handlers.x]\nbuiltin = "fail"\npermanent_exit_codes = [65]\n',
        "handlers.x.permanent_exit_codes: only exec handlers have exit codes",
    ),
    (
        '[handlers.x]\npython = "json:dumps"\npermanent_exit_codes = []\n',
        "handlers.x.permanent_exit_codes: only exec handlers have exit codes",
    ),
    (
        '[handlers.x]\nhttp = "http://h/"\npermanent_exit_codes = [65]\n',
        "handlers.x.permanent_exit_codes: only exec handlers have exit codes",
    ),
    (
        f'[handlers.x]\nexec = ["{sys.executable}"]\npermanent_exit_codes = 65\n',
        "handlers.x.permanent_exit_codes: must be an array of exit codes, got integer 65",
    ),
    (
        f'[handlers.x]\nexec = ["{sys.executable}"]\npermanent_exit_codes = [65, 0]\n',
        "handlers.x.permanent_exit_codes[1]: must be an integer from 1 to 255, got 0",
    ),
    (
        f'[handlers.x]\nexec = ["{sys.executable}"]\npermanent_exit_codes = [256]\n',
        "handlers.x.permanent_exit_codes[0]: must be an integer from 1 to 255, got 256",
    ),
    (
        f'[handlers.x]\nexec = ["{sys.executable}"]\npermanent_exit_codes = [-9]\n',
        "handlers.x.permanent_exit_codes[0]: must be an integer from 1 to 255, got -9",
    ),
    (
        f'[handlers.x]\nexec = ["{sys.executable}"]\npermanent_exit_codes = ["65"]\n',
        "handlers.x.permanent_exit_codes[0]: must be an integer, got string '65'",
    ),
    (
        f'[handlers.x]\nexec = ["{sys.executable}"]\npermanent_exit_codes = [65, 1.5]\n',
        "handlers.x.permanent_exit_codes[1]: must be an integer, got float 1.5",
    ),
    (
        f'[handlers.x]\nexec = ["{sys.executable}"]\npermanent_exit_codes = [65, 75, 65]\n',
        "handlers.x.permanent_exit_codes[2]: duplicate exit code 65",
    ),
    # redirects
    (
        '[handlers.x]\nbuiltin = "echo"\nmax_redirects = 1\n',
        "handlers.x.max_redirects: only http handlers follow redirects",
    ),
    (
        '[handlers.x]\nhttp = "http://h/"\nmax_redirects = 11\n',
        "handlers.x.max_redirects: must be an integer from 0 to 10, got 11",
    ),
    (
        '[handlers.x]\nhttp = "http://h/"\nmax_redirects = -1\n',
        "handlers.x.max_redirects: must be an integer from 0 to 10, got -1",
    ),
    (
        '[handlers.x]\nhttp = "http://h/"\nmax_redirects = true\n',
        "handlers.x.max_redirects: must be an integer, got boolean true",
    ),
    # limits across daemons
    (
        '[handlers.resize]\nbuiltin = "echo"\nrate_limit = "100 per s"\n',
        'handlers.resize.rate_limit: must be "COUNT/s", "COUNT/m" or "COUNT/h" (e.g. "100/s"), '
        "got '100 per s'",
    ),
    ('[handlers.x]\nbuiltin = "echo"\nrate_limit = "100/d"\n', "got '100/d'"),
    ('[handlers.x]\nbuiltin = "echo"\nrate_limit = "100/sec"\n', "got '100/sec'"),
    ('[handlers.x]\nbuiltin = "echo"\nrate_limit = "100 / s"\n', "got '100 / s'"),
    ('[handlers.x]\nbuiltin = "echo"\nrate_limit = "/s"\n', "got '/s'"),
    ('[handlers.x]\nbuiltin = "echo"\nrate_limit = "-1/s"\n', "got '-1/s'"),
    ('[handlers.x]\nbuiltin = "echo"\nrate_limit = "1.5/s"\n', "got '1.5/s'"),
    ('[handlers.x]\nbuiltin = "echo"\nrate_limit = ""\n', "(e.g. \"100/s\"), got ''"),
    (
        '[handlers.x]\nbuiltin = "echo"\nrate_limit = 100\n',
        'handlers.x.rate_limit: must be "COUNT/s", "COUNT/m" or "COUNT/h" (e.g. "100/s"), '
        "got integer 100",
    ),
    (
        '[handlers.x]\nbuiltin = "echo"\nrate_limit = "0/s"\n',
        "handlers.x.rate_limit: COUNT must be from 1 to 1000000, got '0/s'",
    ),
    (
        '[handlers.x]\nbuiltin = "echo"\nrate_limit = "1000001/m"\n',
        "handlers.x.rate_limit: COUNT must be from 1 to 1000000, got '1000001/m'",
    ),
    (
        f'[handlers.x]\nbuiltin = "echo"\nrate_limit = "{"9" * 5000}/h"\n',
        "handlers.x.rate_limit: COUNT must be from 1 to 1000000, got '9999",
    ),
    (
        '[handlers.x]\nbuiltin = "echo"\nrate_limit = "1/s"\nglobal_concurrency = 0\n',
        "handlers.x.global_concurrency: must be an integer from 1 to 100000, got 0",
    ),
    (
        '[handlers.x]\nbuiltin = "echo"\nglobal_concurrency = 0\n',
        "handlers.x.global_concurrency: must be an integer from 1 to 100000, got 0",
    ),
    (
        '[handlers.x]\nbuiltin = "echo"\nglobal_concurrency = 100001\n',
        "handlers.x.global_concurrency: must be an integer from 1 to 100000, got 100001",
    ),
    (
        '[handlers.x]\nbuiltin = "echo"\nglobal_concurrency = 2.0\n',
        "handlers.x.global_concurrency: must be an integer, got float 2.0",
    ),
    (
        '[handlers.x]\nbuiltin = "echo"\nglobal_concurrency = "10"\n',
        "handlers.x.global_concurrency: must be an integer, got string '10'",
    ),
    # schedules
    (
        ECHO + '[[schedules]]\nname = "s"\ncron = "@daily"\ntype = "echo"\npriority = 10\n',
        "schedules[0].priority: must be an integer from 0 to 9, got 10",
    ),
    (
        ECHO + '[[schedules]]\nname = "s"\ncron = "@daily"\ntype = "echo"\npriority = -1\n',
        "schedules[0].priority: must be an integer from 0 to 9, got -1",
    ),
    (
        ECHO + '[[schedules]]\nname = "s"\ncron = "@daily"\ntype = "echo"\npriority = "high"\n',
        "schedules[0].priority: must be an integer, got string 'high'",
    ),
    # retention
    (
        "[retention]\ncompleted = 0\n",
        "retention.completed: must be a number of seconds greater than 0 and at most "
        "315360000, got 0",
    ),
    (
        "[retention]\ncompleted = 315360001\n",
        "retention.completed: must be a number of seconds greater than 0 and at most "
        "315360000, got 315360001",
    ),
    ("[retention]\ncompleted = nan\n", "retention.completed: must be a number of seconds"),
    (
        '[retention]\ncompleted = "1d"\n',
        "retention.completed: must be a number of seconds, got string '1d'",
    ),
    (
        "[retention]\nfailed = -1\n",
        "retention.failed: must be a number of seconds greater than 0 and at most "
        "315360000, got -1",
    ),
    (
        "[retention]\nfailed = 604800000\n",
        "retention.failed: must be a number of seconds greater than 0 and at most "
        "315360000, got 604800000",
    ),
    # callbacks
    (
        '[callbacks]\nallow = "10.0.0.0/8"\n',
        'callbacks.allow: must be an array of networks (a network like "10.0.0.0/8" or an '
        "address like \"10.1.2.3\"), got string '10.0.0.0/8'",
    ),
    (
        '[callbacks]\nallow = ["10.0.0.0/8", "10.0.0.0/33"]\n',
        'callbacks.allow[1]: must be a network like "10.0.0.0/8" or an address like '
        "\"10.1.2.3\", got string '10.0.0.0/33'",
    ),
    ('[callbacks]\ndeny = ["intranet"]\n', "callbacks.deny[0]: must be a network like"),
    ('[callbacks]\ndeny = ["300.1.2.3"]\n', "callbacks.deny[0]: must be a network like"),
    ('[callbacks]\ndeny = ["fe80::/129"]\n', "callbacks.deny[0]: must be a network like"),
    (
        "[callbacks]\ndeny = [10]\n",
        'callbacks.deny[0]: must be a network like "10.0.0.0/8" '
        'or an address like "10.1.2.3", got integer 10',
    ),
    ("callbacks = 1\n", "callbacks: must be a table, got integer 1"),
    # tables of the wrong type
    ('server = "x"\n', "server: must be a table, got string 'x'"),
    ("redis = 1\n", "redis: must be a table, got integer 1"),
    ("workers = [1]\n", "workers: must be a table, got array"),
    ("retention = 1\n", "retention: must be a table, got integer 1"),
]


@pytest.mark.parametrize(("text", "expected"), INVALID)
def test_invalid(text: str, expected: str) -> None:
    # One mistake, one message: no knock-on complaints about other keys.
    (problem,) = problems_of(text)
    assert expected in problem


# Unknown keys


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("colour = 1\n", f"colour: unknown key (known: {TOP_KEYS})"),
        ("[logging]\n", f"logging: unknown key (known: {TOP_KEYS})"),
        (
            '[server]\nlisen = "x"\n',
            f"server.lisen: unknown key (known: {SERVER_KEYS})",
        ),
        (
            '[redis]\nhost = "x"\n',
            "redis.host: unknown key (known: url, prefix, data_dir, cluster, request_timeout, "
            "embedded_listen)",
        ),
        (
            "[workers]\nthreads = 4\n",
            "workers.threads: unknown key (known: concurrency, queues, shutdown_timeout, "
            "heartbeat_interval, dead_after, queue_mode, weights, python_path)",
        ),
        (
            '[handlers.thumb]\nbuiltin = "echo"\nfrob = 1\n',
            f"handlers.thumb.frob: unknown key (known: {HANDLER_KEYS})",
        ),
        (
            '[server]\n"lis ten" = 1\n',
            f'server."lis ten": unknown key (known: {SERVER_KEYS})',
        ),
        (
            "[retention]\ncancelled = 1\n",
            "retention.cancelled: unknown key (known: completed, failed)",
        ),
        (
            '[callbacks]\nallowed = ["10.0.0.0/8"]\n',
            "callbacks.allowed: unknown key (known: allow, deny)",
        ),
    ],
)
def test_unknown_keys(text: str, expected: str) -> None:
    assert problems_of(text) == [expected]


# Types


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[server]\nmax_body = true\n", "server.max_body: must be an integer, got boolean true"),
        (
            "[workers]\nconcurrency = false\n",
            "workers.concurrency: must be an integer, got boolean",
        ),
        ("[workers]\ndead_after = true\n", "workers.dead_after: must be a number of seconds, got"),
        (
            '[handlers.x]\nbuiltin = "echo"\nconcurrency = true\n',
            "handlers.x.concurrency: must be an integer, got boolean true",
        ),
        (
            '[handlers.x]\nbuiltin = "echo"\ntimeout = true\n',
            "handlers.x.timeout: must be a number of seconds, got boolean true",
        ),
        (
            '[handlers.x]\nbuiltin = "echo"\nmax_attempts = true\n',
            "handlers.x.max_attempts: must be an integer, got boolean true",
        ),
        (
            '[handlers.x]\nbuiltin = "echo"\nbackoff_base = true\n',
            "handlers.x.backoff_base: must be a number of seconds, got boolean true",
        ),
        (
            '[handlers.x]\nbuiltin = "echo"\nglobal_concurrency = true\n',
            "handlers.x.global_concurrency: must be an integer, got boolean true",
        ),
        (
            '[handlers.x]\nbuiltin = "echo"\nrate_limit = true\n',
            'handlers.x.rate_limit: must be "COUNT/s", "COUNT/m" or "COUNT/h" (e.g. "100/s"), '
            "got boolean true",
        ),
        (
            ECHO + '[[schedules]]\nname = "s"\ncron = "@daily"\ntype = "echo"\npriority = true\n',
            "schedules[0].priority: must be an integer, got boolean true",
        ),
        (
            f'[handlers.x]\nexec = ["{sys.executable}"]\npermanent_exit_codes = [true]\n',
            "handlers.x.permanent_exit_codes[0]: must be an integer, got boolean true",
        ),
        ("[retention]\nfailed = false\n", "retention.failed: must be a number of seconds, got"),
    ],
)
def test_bool_is_not_a_number(text: str, expected: str) -> None:
    (problem,) = problems_of(text)
    assert problem.startswith(expected)


def test_floats_accept_integers() -> None:
    cfg = parse_text("[workers]\nshutdown_timeout = 10\n" + ECHO)
    assert cfg.workers.shutdown_timeout == 10.0
    assert type(cfg.workers.shutdown_timeout) is float


def test_integer_rejects_datetime() -> None:
    problems = problems_of("[workers]\nconcurrency = 2024-01-01\n")
    assert problems == ["workers.concurrency: must be an integer, got datetime 2024-01-01"]


def test_long_string_is_shortened_in_messages() -> None:
    (problem,) = problems_of(f'[workers]\nconcurrency = "{"x" * 500}"\n')
    assert len(problem) < 150
    (problem,) = problems_of(f'[handlers.x]\nbuiltin = "echo"\nrate_limit = "{"9" * 5000}/s"\n')
    assert len(problem) < 150


# Many problems at once


def test_all_problems_reported_together(tmp_path: Path) -> None:
    path = tmp_path / "taskd.toml"
    path.write_text(
        """
        [server]
        lisen = "x"
        [workers]
        concurrency = 0
        [handlers.thumb]
        builtin = "echo"
        frob = 1
        [handlers.other]
        python = "json:nope"
        """
    )
    with pytest.raises(ConfigError) as info:
        load(path, env={})
    err = info.value
    assert err.source == str(path)
    assert err.problems == [
        f"server.lisen: unknown key (known: {SERVER_KEYS})",
        "workers.concurrency: must be an integer from 1 to 100000, got 0",
        f"handlers.thumb.frob: unknown key (known: {HANDLER_KEYS})",
        "handlers.other.python: module 'json' has no callable 'nope'",
    ]
    lines = str(err).splitlines()
    assert lines == [f"{path}: {p}" for p in err.problems]


def test_file_url_and_env_url_both_checked() -> None:
    text = '[redis]\nurl = "nope"\n' + ECHO
    with pytest.raises(ConfigError) as info:
        parse_text(text, env={"TASKD_REDIS_URL": "also-nope"})
    assert [p.split(":")[0] for p in info.value.problems] == [
        "redis.url",
        "redis.url (from TASKD_REDIS_URL)",
    ]


# ConfigError


def test_config_error_str() -> None:
    err = ConfigError(
        "taskd.toml",
        [
            "workers.concurrency: must be an integer from 1 to 100000, got 0",
            "handlers.thumb.frob: unknown key",
        ],
    )
    assert str(err) == (
        "taskd.toml: workers.concurrency: must be an integer from 1 to 100000, got 0\n"
        "taskd.toml: handlers.thumb.frob: unknown key"
    )
    assert err.source == "taskd.toml"


def test_config_error_pickles() -> None:
    err = ConfigError("taskd.toml", ["a: b"])
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.source, copy.problems, str(copy)) == ("taskd.toml", ["a: b"], "taskd.toml: a: b")


def test_empty_config_needs_a_handler() -> None:
    with pytest.raises(ConfigError) as info:
        parse({}, env={})
    assert info.value.problems == [
        'handlers: at least one handler is required, e.g. [handlers.echo] builtin = "echo"'
    ]


def test_parse_source_is_used_in_errors() -> None:
    with pytest.raises(ConfigError) as info:
        parse({}, source="inline", env={})
    assert str(info.value).startswith("inline: handlers: at least one handler is required")


def test_passwords_are_not_shown() -> None:
    problems = problems_of(
        '[redis]\nurl = "redis://:hunter2@/0"\n'
        '[handlers.x]\nhttp = "ftp://user:hunter3@example.com/"\n'
    )
    assert len(problems) == 2
    assert "hunter" not in "\n".join(problems)
    assert "redis://***@/0" in problems[0]
    with pytest.raises(ConfigError) as info:
        parse_text(ECHO, env={"TASKD_REDIS_URL": "redis://u:hunter4@h:x/0"})
    assert "hunter" not in str(info.value)


# Reading files


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.source == str(path)
    assert info.value.problems == ["cannot read file: No such file or directory"]
    assert str(info.value) == f"{path}: cannot read file: No such file or directory"


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path)
    assert info.value.problems[0].startswith("cannot read file:")


def test_load_takes_a_str_path(tmp_path: Path) -> None:
    path = tmp_path / "taskd.toml"
    path.write_text(ECHO)
    cfg = load(str(path), env={})
    assert cfg.source == str(path)
    assert list(cfg.handlers) == ["echo"]


def test_toml_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "taskd.toml"
    path.write_text('[server]\nlisten = "127.0.0.1:7700\n')
    with pytest.raises(ConfigError) as info:
        load(path, env={})
    (problem,) = info.value.problems
    assert problem.startswith("invalid TOML: ")
    assert "line 2" in problem
    assert "column" in problem


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "taskd.toml"
    path.write_bytes(b'# caf\xe9\n[handlers.echo]\nbuiltin = "echo"\n')
    with pytest.raises(ConfigError) as info:
        load(path, env={})
    assert info.value.problems[0].startswith("not valid UTF-8")


# listen


@pytest.mark.parametrize(
    ("listen", "host", "port", "unix_path"),
    [
        ("127.0.0.1:7700", "127.0.0.1", 7700, None),
        ("0.0.0.0:80", "0.0.0.0", 80, None),
        ("localhost:0", "localhost", 0, None),
        ("taskd.internal.example.com:65535", "taskd.internal.example.com", 65535, None),
        ("[::1]:7700", "::1", 7700, None),
        ("[::]:0", "::", 0, None),
        ("unix:/run/taskd/taskd.sock", None, None, "/run/taskd/taskd.sock"),
    ],
)
def test_listen(listen: str, host: str | None, port: int | None, unix_path: str | None) -> None:
    cfg = parse({"server": {"listen": listen}, "handlers": {"e": {"builtin": "echo"}}}, env={})
    assert cfg.server.listen == listen
    assert (cfg.server.host, cfg.server.port, cfg.server.unix_path) == (host, port, unix_path)


# exec


def test_exec_file_that_is_not_executable(tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    if os.access(script, os.X_OK):  # root may execute anything with any x bit; not here
        pytest.skip("file is executable anyway")
    problems = problems_of(f'[handlers.x]\nexec = ["{script}"]\n')
    assert problems == [f"handlers.x.exec: program '{script}' not found or not executable"]


def test_exec_executable_script(tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    cfg = parse({"handlers": {"x": {"exec": [str(script), "--flag"]}}}, env={})
    assert cfg.handlers["x"].exec == (str(script), "--flag")


# [autoscale]


def test_autoscale_every_key_set() -> None:
    cfg = parse_text(
        """
        [autoscale]
        target_drain_s = 30
        min_daemons = 2
        max_daemons = 8
        hysteresis = 0
        cooldown_up_s = 10
        cooldown_down_s = 600
        poll_interval_s = 5
        url = "http://10.0.0.5:7701"
        start_command = ["/usr/local/bin/up", "--instance={n}"]
        stop_command = ["/usr/local/bin/down", "{n}"]
        command_timeout_s = 90
        state_file = "/var/lib/taskd-autoscale/state.json"
        """
        + ECHO
    )
    assert cfg.autoscale == AutoscaleConfig(
        target_drain_s=30.0,
        min_daemons=2,
        max_daemons=8,
        hysteresis=0.0,
        cooldown_up_s=10.0,
        cooldown_down_s=600.0,
        poll_interval_s=5.0,
        url="http://10.0.0.5:7701",
        start_command=("/usr/local/bin/up", "--instance={n}"),
        stop_command=("/usr/local/bin/down", "{n}"),
        command_timeout_s=90.0,
        state_file=Path("/var/lib/taskd-autoscale/state.json"),
    )
    assert isinstance(cfg.autoscale.hysteresis, float)
    assert AutoscaleConfig().start_command == ("systemctl", "start", "taskd@{n}")
    assert AutoscaleConfig().stop_command == ("systemctl", "stop", "taskd@{n}")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "min_daemons = 0",
            "autoscale.min_daemons: must be an integer from 1 to 1000, got 0",
        ),
        (
            "min_daemons = 4\nmax_daemons = 3",
            "autoscale.min_daemons: must be at most autoscale.max_daemons (3), got 4",
        ),
        ("hysteresis = 0.95", "autoscale.hysteresis: must be a number from 0 to 0.9, got 0.95"),
        ("hysteresis = -0.1", "autoscale.hysteresis: must be a number from 0 to 0.9, got -0.1"),
        ('hysteresis = "10%"', "autoscale.hysteresis: must be a number from 0 to 0.9, got string"),
        ("target_drain_s = 0", "autoscale.target_drain_s: must be a number of seconds greater"),
        ("cooldown_down_s = -1", "autoscale.cooldown_down_s: must be a number of seconds greater"),
        (
            'url = "10.0.0.5:7701"',
            "autoscale.url: not a daemon URL: '10.0.0.5:7701' (use http://HOST:PORT or unix:/PATH)",
        ),
        (
            'start_command = ["systemctl", "start", "taskd"]',
            "autoscale.start_command: must contain {n}, the instance number, in one of its "
            "arguments",
        ),
        (
            'stop_command = "systemctl stop taskd@{n}"',
            "autoscale.stop_command: must be a non-empty array of a program and its arguments",
        ),
        ('stop_command = ["", "{n}"]', "autoscale.stop_command[0]: must be a non-empty string"),
        ('state_file = ""', "autoscale.state_file: must not be empty"),
    ],
)
def test_autoscale_invalid(text: str, expected: str) -> None:
    (problem,) = problems_of(f"[autoscale]\n{text}\n")
    assert problem.startswith(expected), problem


def test_a_bad_autoscale_table_stops_taskd_check_with_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "taskd.toml"
    path.write_text(ECHO + "[autoscale]\nmax_daemons = 0\n")
    done = subprocess.run(
        [sys.executable, "-m", "taskd", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert f"{path}: autoscale.max_daemons: must be an integer from 1 to 1000" in done.stderr


# The schema: the dataclasses are the one statement of keys and defaults

SECTIONS = [
    ("server", ServerConfig),
    ("redis", RedisConfig),
    ("workers", WorkersConfig),
    ("retention", RetentionConfig),
    ("callbacks", CallbacksConfig),
    ("autoscale", AutoscaleConfig),
    ("tracing", TracingConfig),
]
# Fields the loader fills in itself: none of them is a TOML key.
NOT_KEYS = {
    TracingConfig: {"traces_url", "sampler"},
    ServerConfig: {"host", "port", "unix_path"},
    RedisConfig: {"embedded_address"},
    HandlerConfig: {"name", "kind"},
    Config: {"source"},
}


def wrap(section: str, table: dict[str, object]) -> dict[str, object]:
    """A config document with `table` in place of one table of it, and a valid handler."""
    if section == "handlers":
        return {"handlers": {"x": {"builtin": "echo", **table}}}
    if section == "schedules":
        schedule = {"name": "s", "cron": "@daily", "type": "x", **table}
        return {"handlers": {"x": {"builtin": "echo"}}, "schedules": [schedule]}
    if section == "tracing":  # whose table needs an endpoint
        table = {"otlp_endpoint": "http://jaeger:4318", **table}
    return {section: table, "handlers": {"x": {"builtin": "echo"}}}


def parse_problems(data: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(data, env={})
    return info.value.problems


def key_fields(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema) if f.name not in NOT_KEYS.get(schema, ())]


def path_of(section: str) -> str:
    return {"handlers": "handlers.x", "schedules": "schedules[0]"}.get(section, section)


ALL_SECTIONS = [*SECTIONS, ("handlers", HandlerConfig), ("schedules", config.ScheduleConfig)]


@pytest.mark.parametrize(("section", "schema"), ALL_SECTIONS)
def test_the_known_keys_are_the_dataclass_fields(section: str, schema: type) -> None:
    problems = parse_problems(wrap(section, {"no_such_key": 1}))
    known = ", ".join(key_fields(schema))
    assert problems == [f"{path_of(section)}.no_such_key: unknown key (known: {known})"]


@pytest.mark.parametrize(("section", "schema"), [*ALL_SECTIONS, ("", Config)])
def test_fields_the_loader_fills_in_are_not_keys(section: str, schema: type) -> None:
    for name in NOT_KEYS.get(schema, ()):
        data = wrap(section, {name: "x"}) if section else {**wrap("server", {}), name: "x"}
        problems = parse_problems(data)
        assert problems[0].startswith(f"{path_of(section) + '.' if section else ''}{name}: unknown")


def test_the_top_level_keys_are_the_config_fields() -> None:
    problems = parse_problems({"colour": 1, "handlers": {"x": {"builtin": "echo"}}})
    listed = problems[0].partition("(known: ")[2].rstrip(")").split(", ")
    assert sorted(listed) == sorted(key_fields(Config))


@pytest.mark.parametrize(("section", "schema"), ALL_SECTIONS)
def test_every_key_is_read_and_checked(section: str, schema: type) -> None:
    # A datetime is no value of any key (but a payload, which may be anything): a key the
    # loader forgot to read would take it silently.
    odd = datetime.datetime(2024, 1, 2, 3, 4, 5)
    for name in key_fields(schema):
        if name == "payload" or (section == "handlers" and name == "builtin"):
            continue
        problems = parse_problems(wrap(section, {name: odd}))
        assert any(p.startswith(f"{path_of(section)}.{name}") for p in problems), (name, problems)


def test_a_schedule_given_only_what_is_required_has_the_dataclass_defaults() -> None:
    cfg = parse(wrap("schedules", {}), env={})
    assert cfg.schedules == (config.ScheduleConfig(name="s", cron="@daily", type="x"),)


def test_a_handler_given_only_its_kind_has_the_dataclass_defaults() -> None:
    cfg = parse(wrap("handlers", {}), env={})
    assert cfg.handlers["x"] == HandlerConfig(name="x", kind="builtin", builtin="echo")


# What config shares with the rest of taskd, and what it does not import


def test_config_imports_neither_slots_nor_the_runtime_handlers() -> None:
    code = (
        "import sys, taskd.config; print(sorted(m for m in sys.modules if m.startswith('taskd')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(ast.literal_eval(out.stdout))
    assert not loaded & {"taskd.slots", "taskd.handlers", "taskd.daemon", "taskd.store"}


def test_slots_takes_its_queue_modes_from_config() -> None:
    from taskd import slots

    assert slots.QUEUE_MODES is config.QUEUE_MODES


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("json", "must look like 'package.module:function', got 'json'"),
        ("json:nope", "module 'json' has no callable 'nope'"),
        ("json:JSONEncoder.nope", "module 'json' has no callable 'JSONEncoder.nope'"),
        ("json:__doc__", "module 'json' has no callable '__doc__'"),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz': No module named"),
    ],
)
def test_one_resolver_refuses_a_target_for_config_and_handlers_alike(
    target: str, reason: str
) -> None:
    from taskd.handlers import Handlers

    problems = parse_problems({"handlers": {"x": {"python": target}}})
    assert len(problems) == 1
    assert problems[0].startswith(f"handlers.x.python: {reason}")
    with pytest.raises(config.TargetError) as info:
        config.resolve(target)
    assert str(info.value).startswith(reason)
    with pytest.raises(type(info.value)) as at_start:
        Handlers({"p": HandlerConfig(name="p", kind="python", python=target)})
    assert str(at_start.value).startswith(f"handler 'p': python {reason}")


def test_the_resolver_finds_functions_and_methods() -> None:
    assert config.resolve("json:dumps") is json.dumps
    assert config.resolve("json:JSONEncoder.encode") is json.JSONEncoder.encode
    # A name that is there but not callable, and one that is not there, are AttributeErrors
    # too, as a plain getattr's would be.
    with pytest.raises(AttributeError):
        config.resolve("json:nope")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@host:6379/0", "redis://***@host:6379/0"),
        ("redis://user:hunter2@host/0", "redis://***@host/0"),
        ("rediss://token@host/0", "rediss://***@host/0"),
        # A password with an "@" is hidden whole, as urlsplit reads it.
        ("redis://u:hun@ter2@host/0", "redis://***@host/0"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
        ("embedded", "embedded"),
    ],
)
def test_redact(url: str, shown: str) -> None:
    assert config.redact(url) == shown


def test_the_daemon_logs_urls_through_the_one_redactor() -> None:
    from taskd import cli, daemon

    assert daemon.redact is config.redact
    assert cli.redact is config.redact
    assert not hasattr(daemon, "redacted")


# [tracing], and the OTEL_* variables over it

JAEGER = "http://jaeger:4318"


def test_tracing_is_off_without_a_tracing_table_whatever_the_environment() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": JAEGER, "OTEL_SERVICE_NAME": "x"}
    cfg = parse(wrap("server", {}), env=env)
    assert cfg.tracing == TracingConfig()
    assert not cfg.tracing.on


@pytest.mark.parametrize(
    ("table", "env", "expected"),
    [
        (
            {"otlp_endpoint": JAEGER},
            {},
            TracingConfig(otlp_endpoint=JAEGER, traces_url=f"{JAEGER}/v1/traces"),
        ),
        (
            {"otlp_endpoint": "https://otel.example.com/base/", "sample_ratio": 0},
            {},
            TracingConfig(
                otlp_endpoint="https://otel.example.com/base/",
                sample_ratio=0.0,
                traces_url="https://otel.example.com/base/v1/traces",
            ),
        ),
        (
            {},
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"},
            TracingConfig(traces_url="http://collector:4318/v1/traces"),
        ),
        (
            {"otlp_endpoint": JAEGER, "service_name": "jobs", "sample_ratio": 0.5},
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:4318/custom/path",
                "OTEL_SERVICE_NAME": "jobs-eu",
                "OTEL_TRACES_SAMPLER": "parentbased_always_on",
                "OTEL_TRACES_SAMPLER_ARG": "0.125",
            },
            TracingConfig(
                otlp_endpoint=JAEGER,
                service_name="jobs-eu",
                sample_ratio=0.125,
                traces_url="http://traces:4318/custom/path",
                sampler="parentbased_always_on",
            ),
        ),
        (
            {"otlp_endpoint": JAEGER},
            {"OTEL_SDK_DISABLED": "True", "OTEL_EXPORTER_OTLP_ENDPOINT": "not even a URL"},
            TracingConfig(),
        ),
    ],
)
def test_tracing_takes_the_otel_variables_over_its_keys(
    table: dict[str, object], env: dict[str, str], expected: TracingConfig
) -> None:
    assert parse(wrap("tracing", {}) | {"tracing": table}, env=env).tracing == expected


@pytest.mark.parametrize(
    ("table", "env", "expected"),
    [
        (
            {},
            {},
            "tracing.otlp_endpoint: is required: the collector's OTLP/HTTP address, e.g. "
            '"http://jaeger:4318" (or OTEL_EXPORTER_OTLP_ENDPOINT)',
        ),
        (
            {"otlp_endpoint": "jaeger:4318"},
            {},
            "tracing.otlp_endpoint: must be an http:// or https:// URL (OTLP/HTTP, port 4318), "
            "got 'jaeger:4318'",
        ),
        (
            {"otlp_endpoint": "http://jaeger:4318/v1/traces"},
            {},
            "tracing.otlp_endpoint: give the base URL (taskd adds /v1/traces), "
            "got 'http://jaeger:4318/v1/traces'",
        ),
        (
            {"otlp_endpoint": "http://user:secret@jaeger:port"},
            {},
            "tracing.otlp_endpoint: invalid URL 'http://***@jaeger:port': Port could not be "
            "cast to integer value as 'port'",
        ),
        (
            {},
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "grpc://collector:4317"},
            "tracing.otlp_endpoint (from OTEL_EXPORTER_OTLP_ENDPOINT): must be an http:// or "
            "https:// URL (OTLP/HTTP, port 4318), got 'grpc://collector:4317'",
        ),
        (
            {"otlp_endpoint": JAEGER, "service_name": " "},
            {},
            "tracing.service_name: must not be empty",
        ),
        (
            {"otlp_endpoint": JAEGER, "sample_ratio": 1.5},
            {},
            "tracing.sample_ratio: must be a number from 0 to 1, got 1.5",
        ),
        (
            {"otlp_endpoint": JAEGER, "sample_ratio": "all"},
            {},
            "tracing.sample_ratio: must be a number from 0 to 1, got string 'all'",
        ),
        (
            {"otlp_endpoint": JAEGER},
            {"OTEL_TRACES_SAMPLER_ARG": "-0.5"},
            "tracing.sample_ratio (from OTEL_TRACES_SAMPLER_ARG): must be a number from 0 to 1, "
            "got -0.5",
        ),
        (
            {"otlp_endpoint": JAEGER},
            {"OTEL_TRACES_SAMPLER": "jaeger_remote"},
            "tracing.sample_ratio (from OTEL_TRACES_SAMPLER): taskd takes the samplers "
            "always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off, "
            "parentbased_traceidratio, got 'jaeger_remote'",
        ),
    ],
)
def test_a_bad_tracing_value_names_its_key_and_where_it_came_from(
    table: dict[str, object], env: dict[str, str], expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse({"tracing": table, "handlers": {"x": {"builtin": "echo"}}}, env=env)
    assert info.value.problems == [expected]


def test_tracing_without_the_otel_extra_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(config.tracing.importlib.util, "find_spec", lambda name: None)
    problems = parse_problems(wrap("tracing", {}))
    assert problems == [
        "tracing.otlp_endpoint: tracing needs the otel extra: pip install 'taskd[otel]'"
    ]


def test_taskd_check_exits_2_on_a_bad_tracing_variable(tmp_path: Path) -> None:
    path = tmp_path / "taskd.toml"
    path.write_text(f'[tracing]\notlp_endpoint = "{JAEGER}"\n\n{ECHO}')
    env = {**os.environ, "OTEL_TRACES_SAMPLER_ARG": "half"}
    done = subprocess.run(
        [TASKD, "check", "--config", str(path)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (
        f"{path}: tracing.sample_ratio (from OTEL_TRACES_SAMPLER_ARG): must be a number from "
        "0 to 1, got string 'half'"
    )
