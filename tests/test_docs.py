"""The docs say true things: every shell block of README.md and docs/*.md is run or marked.

Each fenced `sh` or `console` block is preceded by a marker: `<!-- test: NAME -->`, run by
the test below that owns NAME, or `<!-- not run: REASON -->`. A block with neither fails
the suite, so new commands cannot drift. A `console` block's commands are its `$ ` lines
(a line ending in a backslash goes on); what follows a command, up to the next, is its
documented output, of which the test checks what does not vary: the scalar fields other
than ids and times, the HTTP status line, and the fixed parts of text lines (`…` stands
for what is left out). Ids the docs show (`01a20d20-…`) stand for the real ones the
earlier commands returned. Reads are polled until they answer as documented. A `python`
block marked `<!-- test: NAME -->` runs as a script, and prints what the comments of its
`print(...)  # OUTPUT` lines say, in order. Other blocks a test takes from the docs as they
are carry `<!-- config: NAME -->` (TOML) or `<!-- code: NAME -->` (Python, run by
tests/test_signing.py).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import sys
import tomllib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest

from taskd.config import parse
from tests.builders import shipped_config
from tests.support import REPO, TASKD, DaemonProcess, wait_healthy, wait_until

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL = {"sh", "console"}
MARKER = re.compile(r"^<!--\s*(test|not run|config|code):\s*(.*?)\s*-->$")

# The names `<!-- test: NAME -->` may give, each run by one test of this file.
RUNNERS = {
    "install-and-run": "test_install_and_run_is_what_the_walk_through_starts",
    "ci-runs-it": "test_the_test_command_is_the_one_ci_runs",
    "walk-through": "test_walk_through_against_the_daemon_the_readme_starts",
    "priorities": "test_priorities_and_limits_against_a_daemon_with_the_documented_config",
    "limits": "test_priorities_and_limits_against_a_daemon_with_the_documented_config",
    "command-line": "test_command_line",
    "promtool": "test_alert_rules_commands",
    "bench-quick": "test_quick_bench_command",
    "make-secret": "test_a_made_signing_secret_is_one_taskd_takes",
    "scale-out": "test_process.py::test_a_second_daemon_shares_the_first_ones_embedded_redis",
    "archive": "test_archive_commands",
    "python-client": "test_python_client_examples",
    "tracing": "test_tracing.py::test_a_daemon_sends_its_spans_over_otlp_http_when_it_stops",
}

# Output fields that differ from run to run: ids (mapped separately), times, hosts.
VARYING = {
    "id", "time", "created_at", "started_at", "finished_at", "run_at", "last_heartbeat",
    "heartbeat_age_ms", "uptime_s", "daemon", "host", "pid", "at", "job", "wait_ms",
    "version", "used_memory",
}  # fmt: skip
# A python block's line that prints, and what its comment says it prints.
PRINTS = re.compile(r"\bprint\(.*\)\s+# (.*)$")
PAIR = re.compile(r'"(\w+)":\s*("(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?|true|false|null)')
ID = re.compile(r'"id":\s*"([^"]*)"')
STATUS = re.compile(r"^HTTP/[\d.]+ (\d{3})\b")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    marker: tuple[str, str] | None
    body: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


@dataclass(frozen=True)
class Command:
    text: str
    expected: list[str]


def parse_blocks(path: Path) -> Iterator[Block]:
    """The fenced blocks of a markdown file, each with the marker on the line before it."""
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].startswith("```"):
            i += 1
            continue
        lang, start = lines[i][3:].strip(), i
        previous = next((line for line in reversed(lines[:i]) if line.strip()), "")
        found = MARKER.match(previous.strip())
        end = lines.index("```", i + 1)
        marker = (found.group(1), found.group(2)) if found else None
        yield Block(path, start + 1, lang, marker, "\n".join(lines[start + 1 : end]))
        i = end + 1


def all_blocks() -> list[Block]:
    return [block for path in DOCS for block in parse_blocks(path)]


def blocks_named(kind: str, name: str) -> list[Block]:
    found = [b for b in all_blocks() if b.marker == (kind, name)]
    assert found, f"no block is marked <!-- {kind}: {name} -->"
    return found


def console_commands(block: Block) -> list[Command]:
    """The `$ ` lines of a console block (with their continuations) and the output after each."""
    commands: list[Command] = []
    lines = block.body.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("$ "):
            text = lines[i][2:]
            while text.endswith("\\") and i + 1 < len(lines):
                i += 1
                text += "\n" + lines[i]
            commands.append(Command(text, []))
        elif lines[i].strip():
            assert commands, f"{block.where}: output before the first command"
            commands[-1].expected.append(lines[i])
        i += 1
    return commands


def _is_text(line: str) -> bool:
    stripped = line.strip()
    return stripped not in ("", "…") and '":' not in stripped and stripped[0] not in "{}[]"


def _line_pattern(line: str) -> re.Pattern[str]:
    """A documented text line as a pattern for a whole output line: `…` stands for anything."""
    parts = " ".join(line.split()).split("…")
    return re.compile(".*".join(re.escape(part) for part in parts))


def compare(
    expected: list[str], actual: str, ids: dict[str, str]
) -> tuple[list[str], dict[str, str]]:
    """What in `actual` differs from the documented output, and the ids it maps."""
    problems: list[str] = []
    shown = "\n".join(expected)
    found: dict[str, str] = {}
    actual_ids = ID.findall(actual)
    for n, placeholder in enumerate(ID.findall(shown)):
        if n >= len(actual_ids):
            problems.append(f"no id for {placeholder}")
        elif ids.get(placeholder, actual_ids[n]) != actual_ids[n]:
            problems.append(f"{placeholder} is {actual_ids[n]}, not {ids[placeholder]}")
        else:
            found[placeholder] = actual_ids[n]
    got = set(PAIR.findall(actual))
    for key, value in PAIR.findall(shown):
        if key not in VARYING and "…" not in value and (key, value) not in got:
            problems.append(f'"{key}":{value} not in the output')
    actual_lines = [" ".join(line.split()) for line in actual.splitlines()]
    for line in expected:
        if status := STATUS.match(line):
            if not (actual_lines and actual_lines[0].split()[1:2] == [status.group(1)]):
                problems.append(f"status is not {status.group(1)}")
        elif _is_text(line):
            pattern = _line_pattern(line)
            if not any(pattern.fullmatch(a) for a in actual_lines):
                problems.append(f"no line like {line.strip()!r}")
    return problems, found


def user_env() -> dict[str, str]:
    """This environment without taskd's variables, which would change what commands find."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TASKD_")}


def _is_read(command: str) -> bool:
    """A command that changes nothing, so that it may be repeated until it answers."""
    if " stats" in command and "taskd" in command:
        return True
    return command.startswith("curl") and "-X" not in command and "--json" not in command


@dataclass
class Shell:
    """Runs documented commands with bash against one daemon, as a user would type them."""

    address: str  # what `localhost:7700` stands for
    cwd: Path
    env: dict[str, str]
    ids: dict[str, str]

    def prepare(self, text: str) -> str:
        for placeholder, real in self.ids.items():
            text = text.replace(placeholder, real)
        assert "…" not in text, f"no earlier output gave the id in {text!r}"
        return text.replace("localhost:7700", self.address).replace(
            ".venv/bin/", f"{TASKD.parent}/"
        )

    async def run(self, text: str) -> str:
        done = await anyio.run_process(
            ["bash", "-c", text], cwd=self.cwd, env=self.env, check=False
        )
        output = done.stdout.decode().replace("\r", "")
        assert done.returncode == 0, f"`{text}` exited {done.returncode}:\n{output}{done.stderr!r}"
        return output

    async def run_console(self, block: Block) -> None:
        for command in console_commands(block):
            text = self.prepare(command.text)
            last: tuple[list[str], str] = ([], "")

            async def answers(text: str = text, command: Command = command) -> bool:
                nonlocal last
                output = await self.run(text)
                problems, found = compare(command.expected, output, self.ids)
                last = problems, output
                if not problems:
                    self.ids.update(found)
                return not problems

            what = f"{block.where}: `{command.text}` to answer as documented"
            try:
                if _is_read(command.text):
                    await wait_until(answers, what)
                else:
                    assert await answers(), what
            except AssertionError as error:
                raise AssertionError(f"{error}\n{last[0]}\noutput:\n{last[1]}") from None


@asynccontextmanager
async def shipped_daemon(
    tmp_path: Path, port: int, *, extra: str = ""
) -> AsyncIterator[DaemonProcess]:
    """`taskd --config` on the shipped config (plus `extra`), on a free port and embedded Redis."""
    config = shipped_config(tmp_path, port)
    config.write_text(config.read_text() + extra)
    daemon = DaemonProcess(["--config", str(config)], cwd=tmp_path)
    try:
        await wait_healthy(f"http://127.0.0.1:{port}", daemon)
        yield daemon
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0, daemon.output()
    finally:
        daemon.kill()


def test_every_shell_block_is_run_or_marked_not_run() -> None:
    problems = []
    used = set()
    for block in all_blocks():
        if block.lang not in SHELL:
            # Other blocks need no marker, but one they have must name a runner.
            if block.marker is not None and block.marker[0] == "test":
                used.add(block.marker[1])
                if block.marker[1] not in RUNNERS:
                    problems.append(f"{block.where}: no test runs {block.marker[1]!r}")
            continue
        if block.marker is None:
            problems.append(f"{block.where}: no <!-- test: NAME --> or <!-- not run: REASON -->")
        elif block.marker[0] == "test":
            used.add(block.marker[1])
            if block.marker[1] not in RUNNERS:
                problems.append(f"{block.where}: no test runs {block.marker[1]!r}")
        elif block.marker[0] != "not run" or not block.marker[1]:
            problems.append(f"{block.where}: {block.marker} gives no reason")
    assert not problems, "\n".join(problems)
    assert used == set(RUNNERS), f"markers gone from the docs: {set(RUNNERS) - used}"


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_lead_to_files_and_headings_that_exist() -> None:
    problems = []
    for path in DOCS:
        text = path.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"\w+:", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                problems.append(f"{path.name}: {target}: no such file")
            elif anchor and linked.suffix == ".md":
                headings = re.findall(r"(?m)^#+ (.+)$", linked.read_text())
                if anchor not in {_slug(h) for h in headings}:
                    problems.append(f"{path.name}: {target}: no such heading")
    assert not problems, "\n".join(problems)


def _install_and_run() -> list[str]:
    [block] = blocks_named("test", "install-and-run")
    return block.body.split(" && ")


def test_install_and_run_is_what_the_walk_through_starts() -> None:
    """The install steps are CI's (whose test extra holds what `embedded` installs); the
    walk-through test runs the last part, the daemon."""
    venv, install, run = _install_and_run()
    assert venv == "python3 -m venv .venv"
    assert install == ".venv/bin/pip install -e '.[embedded]'"
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = extras["optional-dependencies"]
    assert set(extras["embedded"]) <= set(extras["test"])
    assert shlex.split(run) == [".venv/bin/taskd", "--config", "config/taskd.toml"]


def test_the_test_command_is_the_one_ci_runs() -> None:
    [block] = blocks_named("test", "ci-runs-it")
    assert block.body in (REPO / ".ci" / "run").read_text().splitlines()


async def test_walk_through_against_the_daemon_the_readme_starts(
    tmp_path: Path, free_port: Any
) -> None:
    args = shlex.split(_install_and_run()[-1])
    assert args[1:] == ["--config", "config/taskd.toml"]  # what shipped_daemon starts
    port = free_port()
    async with shipped_daemon(tmp_path, port):
        shell = Shell(f"127.0.0.1:{port}", tmp_path, user_env(), {})
        for block in blocks_named("test", "walk-through"):
            await shell.run_console(block)


async def test_priorities_and_limits_against_a_daemon_with_the_documented_config(
    tmp_path: Path, free_port: Any
) -> None:
    [config] = blocks_named("config", "limits")
    assert config.lang == "toml"
    port = free_port()
    async with shipped_daemon(tmp_path, port, extra="\n" + config.body + "\n"):
        shell = Shell(f"127.0.0.1:{port}", tmp_path, user_env(), {})
        for block in blocks_named("test", "priorities") + blocks_named("test", "limits"):
            await shell.run_console(block)


async def test_command_line(tmp_path: Path, free_port: Any) -> None:
    """`taskd check`, `submit` and `stats` as documented, finding the daemon by $TASKD_URL."""
    port = free_port()
    async with shipped_daemon(tmp_path, port):
        env = {**user_env(), "TASKD_URL": f"http://127.0.0.1:{port}"}
        shell = Shell(f"127.0.0.1:{port}", REPO, env, {})
        for block in blocks_named("test", "command-line"):
            await shell.run_console(block)


async def test_python_client_examples(tmp_path: Path, free_port: Any) -> None:
    """The Python examples, each a script against the daemon the README starts (which the
    client finds by $TASKD_URL), print what their comments say."""
    port = free_port()
    async with shipped_daemon(tmp_path, port):
        env = {**user_env(), "TASKD_URL": f"http://127.0.0.1:{port}"}
        for block in blocks_named("test", "python-client"):
            assert block.lang == "python", block.where
            script = tmp_path / "example.py"
            script.write_text(block.body + "\n")
            done = await anyio.run_process(
                [sys.executable, str(script)], cwd=tmp_path, env=env, check=False
            )
            assert done.returncode == 0, f"{block.where}:\n{done.stderr.decode()}"
            printed = [m.group(1) for line in block.body.splitlines() if (m := PRINTS.search(line))]
            assert done.stdout.decode().splitlines() == printed, block.where


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (Debian package prometheus)",
)
async def test_alert_rules_commands() -> None:
    [block] = blocks_named("test", "promtool")
    await Shell("", REPO, user_env(), {}).run("set -e\n" + block.body)


async def test_quick_bench_command(tmp_path: Path) -> None:
    for block in blocks_named("test", "bench-quick"):
        await Shell("", tmp_path, user_env(), {}).run_console(block)


async def test_a_made_signing_secret_is_one_taskd_takes(tmp_path: Path) -> None:
    [block] = blocks_named("test", "make-secret")
    made = [await Shell("", tmp_path, user_env(), {}).run(block.body) for _ in range(2)]
    secrets = [text.strip() for text in made]
    assert secrets[0] != secrets[1]  # random each time
    data = {"server": {"signing_secrets": secrets}, "handlers": {"e": {"builtin": "echo"}}}
    config = parse(data, env={})
    assert [len(secret.key) for secret in config.server.signing_secrets] == [32, 32]


async def test_archive_commands(tmp_path: Path, free_port: Any, archive_url: str) -> None:
    """The archive's commands against the shipped config with [archive] on a real PostgreSQL."""
    port = free_port()
    extra = f'\n[archive]\nurl = "{archive_url}"\n'
    async with shipped_daemon(tmp_path, port, extra=extra):
        shell = Shell(f"127.0.0.1:{port}", tmp_path, user_env(), {})
        for block in blocks_named("test", "archive"):
            await shell.run_console(block)
