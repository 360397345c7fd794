"""The [handlers] tables: each handler's kind, limits, environment and target, checked."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping

from taskd.config.model import (
    BUILTINS,
    KINDS,
    MAX_ATTEMPTS,
    QUEUE_NAME,
    QUEUE_RULE,
    RATE_UNITS,
    HandlerConfig,
    RateLimit,
)
from taskd.config.tables import Table, describe, join
from taskd.config.targets import NoModule, TargetError, resolve
from taskd.config.urls import http_url_problem

HANDLER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
HANDLER_RULE = "1-128 letters, digits, '_', '.', ':' or '-', starting with a letter or digit"
_NO_HANDLERS = 'at least one handler is required, e.g. [handlers.echo] builtin = "echo"'
_WEEK = 7 * 24 * 3600.0
_MAX_REDIRECTS = 10
_MAX_GLOBAL_CONCURRENCY = 100_000
_RATE_LIMIT = re.compile(r"([0-9]+)/([smh])")
_MAX_RATE_COUNT = 1_000_000
_RATE_RULE = 'must be "COUNT/s", "COUNT/m" or "COUNT/h" (e.g. "100/s")'
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ENV_RULE = "use letters, digits and '_', not starting with a digit"
# The job's own variables (TASKD_JOB_ID and the like) and the daemon's (TASKD_REDIS_URL,
# with its password) share this prefix: a handler may neither fake the one nor leak the other.
_JOB_ENV_PREFIX = "TASKD_"
# Where a python handler's module was looked for, and where a module it imports belongs.
_IMPORT_HINT = (
    " (looked in the config file's directory, [workers] python_path, then the packages "
    "of taskd's own Python)"
)
_DEPENDENCY_HINT = " (a module the handler imports: install it into taskd's own Python)"


def valid_handler_name(name: str) -> bool:
    """Whether `name` may name a handler (and so a job type) or a schedule."""
    return HANDLER_NAME.fullmatch(name) is not None


def read_handlers(root: Table) -> dict[str, HandlerConfig]:
    raw = root.data.get("handlers", {})
    if not isinstance(raw, Mapping):
        root.problem("handlers", f"must be a table, got {describe(raw)}")
        return {}
    if not raw:
        root.problem("handlers", _NO_HANDLERS)
    handlers: dict[str, HandlerConfig] = {}
    for name, spec in raw.items():
        path = join("handlers", name)
        if not valid_handler_name(name):
            root.problems.append(f"{path}: invalid handler name: use {HANDLER_RULE}")
        if not isinstance(spec, Mapping):
            root.problems.append(f"{path}: must be a table, got {describe(spec)}")
            continue
        handlers[name] = _handler(name, Table(spec, path, root.problems, schema=HandlerConfig))
    return handlers


def _handler(name: str, t: Table) -> HandlerConfig:
    given = [kind for kind in KINDS if kind in t.data]
    if len(given) != 1:
        got = " and ".join(given) or "none"
        t.problems.append(f"{t.path}: give exactly one of {', '.join(KINDS)} (got {got})")
    builtin = _builtin(t) if "builtin" in t.data else None
    python = _python(t) if "python" in t.data else None
    env = _env(t, given)
    argv = _exec(t, dict(env).get("PATH")) if "exec" in t.data else None
    http = _http(t) if "http" in t.data else None
    queue = t.string("queue")
    if "queue" not in t.bad and not QUEUE_NAME.fullmatch(queue):
        t.problem("queue", f"invalid queue name {queue!r}: use {QUEUE_RULE}")
    timeout = t.seconds("timeout", most=_WEEK)
    concurrency = t.optional_integer("concurrency", 1)
    max_attempts = t.integer("max_attempts", 1, MAX_ATTEMPTS)
    backoff_base, backoff_max = _backoff(t)
    exit_codes = _exit_codes(t, given)
    pass_env = _pass_env(t, given)
    rate_limit = _rate_limit(t) if "rate_limit" in t.data else None
    global_concurrency = t.optional_integer("global_concurrency", 1, _MAX_GLOBAL_CONCURRENCY)
    max_redirects = _max_redirects(t, given)
    return HandlerConfig(
        name=name,
        kind=given[0] if len(given) == 1 else "",
        builtin=builtin,
        python=python,
        exec=argv,
        http=http,
        queue=queue,
        timeout=timeout,
        concurrency=concurrency,
        max_attempts=max_attempts,
        backoff_base=backoff_base,
        backoff_max=backoff_max,
        permanent_exit_codes=exit_codes,
        rate_limit=rate_limit,
        global_concurrency=global_concurrency,
        env=env,
        pass_env=pass_env,
        max_redirects=max_redirects,
    )


def _backoff(t: Table) -> tuple[float, float]:
    base = t.seconds("backoff_base")
    most = t.seconds("backoff_max", most=_WEEK)
    # A cap below the first wait would silently override backoff_base: a contradiction.
    if not t.bad & {"backoff_base", "backoff_max"} and most < base:
        t.problem(
            "backoff_max",
            f"must be at least {t.key('backoff_base')} ({base:g}), got {most:g}",
        )
    return base, most


def _only_for(t: Table, name: str, kinds: list[str], kind: str, rule: str) -> bool:
    """Whether key `name` is given and may be read: its handler is of `kind`."""
    if name not in t.data:
        return False
    # With no kind given, "give exactly one of ..." is the problem; this would be noise.
    if kinds and kind not in kinds:
        t.problem(name, rule)
        return False
    return True


def _max_redirects(t: Table, kinds: list[str]) -> int:
    rule = "only http handlers follow redirects"
    if not _only_for(t, "max_redirects", kinds, "http", rule):
        return int(t.default("max_redirects"))
    return t.integer("max_redirects", 0, _MAX_REDIRECTS)


def _rate_limit(t: Table) -> RateLimit | None:
    value = t.data["rate_limit"]
    shown = describe(value).removeprefix("string ")  # a string shows quoted, as in the file
    match = _RATE_LIMIT.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        t.problem("rate_limit", f"{_RATE_RULE}, got {shown}")
        return None
    digits = match[1].lstrip("0")
    # Compared as text first: int() of thousands of digits raises.
    if len(digits) > len(str(_MAX_RATE_COUNT)) or not 1 <= int(digits or "0") <= _MAX_RATE_COUNT:
        t.problem("rate_limit", f"COUNT must be from 1 to {_MAX_RATE_COUNT}, got {shown}")
        return None
    return RateLimit(count=int(digits), per_ms=RATE_UNITS[match[2]])


def _exit_codes(t: Table, kinds: list[str]) -> tuple[int, ...]:
    rule = "only exec handlers have exit codes"
    if not _only_for(t, "permanent_exit_codes", kinds, "exec", rule):
        return ()
    codes = t.integers("permanent_exit_codes", 1, 255, "exit codes")
    seen: set[int] = set()
    for i, code in enumerate(codes):
        if code in seen:
            t.problem("permanent_exit_codes", f"duplicate exit code {code}", suffix=f"[{i}]")
        seen.add(code)
    return () if "permanent_exit_codes" in t.bad else codes


def _exec_only(t: Table, name: str, kinds: list[str]) -> bool:
    """Whether key `name` is given and may be read: its handler runs a program."""
    return _only_for(t, name, kinds, "exec", "only exec handlers run a program with an environment")


def _env(t: Table, kinds: list[str]) -> tuple[tuple[str, str], ...]:
    if not _exec_only(t, "env", kinds):
        return ()
    e = t.table("env")  # every key is read here, so the table reports none as unknown
    pairs = []
    for name, value in e.data.items():
        if problem := _env_name_problem(name):
            e.problem(name, problem)
        elif not isinstance(value, str):
            e.problem(name, f"must be a string, got {describe(value)}")
        elif "\0" in value:
            # The value is not shown: it may well be a secret.
            e.problem(name, "must not contain a NUL byte")
        else:
            pairs.append((name, value))
    return tuple(pairs)


def _pass_env(t: Table, kinds: list[str]) -> tuple[str, ...]:
    if not _exec_only(t, "pass_env", kinds):
        return ()
    names = t.data["pass_env"]
    if not isinstance(names, list | tuple):
        t.problem("pass_env", f"must be an array of variable names, got {describe(names)}")
        return ()
    seen: set[str] = set()
    for i, name in enumerate(names):
        if not isinstance(name, str):
            t.problem("pass_env", f"must be a string, got {describe(name)}", suffix=f"[{i}]")
            continue
        problem = _env_name_problem(name)
        if problem is None and name in seen:
            problem = f"duplicate name {name!r}"
        if problem is not None:
            t.problem("pass_env", problem, suffix=f"[{i}]")
        seen.add(name)
    return () if "pass_env" in t.bad else tuple(names)


def _env_name_problem(name: str) -> str | None:
    if not _ENV_NAME.fullmatch(name):
        return f"invalid environment variable name {name!r}: {_ENV_RULE}"
    if name.startswith(_JOB_ENV_PREFIX):
        return (
            f"reserved name {name!r}: {_JOB_ENV_PREFIX}* names are taskd's (the job's "
            "variables cannot be overridden, the daemon's are not passed on)"
        )
    return None


def _builtin(t: Table) -> str:
    builtin = t.string("builtin", default="")
    if "builtin" not in t.bad and builtin not in BUILTINS:
        t.problem("builtin", f"unknown builtin {builtin!r} (known: {', '.join(BUILTINS)})")
    return builtin


def _python(t: Table) -> str:
    target = t.string("python", default="")
    if "python" in t.bad:
        return target
    # Importing now turns a typo into a refusal to start, not a failure per job.
    try:
        resolve(target)
    except NoModule as e:
        t.problem("python", f"{e}{_IMPORT_HINT if e.own else _DEPENDENCY_HINT}")
    except TargetError as e:
        t.problem("python", str(e))
    return target


def _exec(t: Table, env_path: str | None) -> tuple[str, ...]:
    """The argv; a bare program name is looked up on the PATH the program will get."""
    argv = t.strings("exec", "strings (the program and its arguments)", default=())
    if "exec" in t.bad:
        return argv
    program = argv[0]
    if os.path.isabs(program):
        found = os.path.isfile(program) and os.access(program, os.X_OK)
    elif "/" in program or os.sep in program:
        # A relative path would depend on the working directory of whoever starts taskd.
        t.problem("exec", f"program must be an absolute path or a name on PATH, got {program!r}")
        return argv
    else:
        # A handler's env.PATH is where the program will be looked up, not the daemon's.
        found = shutil.which(program, path=env_path) is not None
        if not found and env_path is not None:
            t.problem("exec", f"program {program!r} not found on {t.key('env')}.PATH")
            return argv
    if not found:
        t.problem("exec", f"program {program!r} not found or not executable")
    return argv


def _http(t: Table) -> str:
    url = t.string("http", default="")
    if "http" not in t.bad and (problem := http_url_problem(url)):
        t.problem("http", problem)
    return url
