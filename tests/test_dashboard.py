"""The dashboard in a real headless Chromium, against an in-process daemon.

The daemon runs on the test's event loop, so every Selenium call (they block) runs in a
worker thread through `in_browser`. Nothing waits by sleeping: the tests poll the DOM with
WebDriverWait and a deadline.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import anyio
import pytest

from taskd.daemon import Daemon
from taskd.jobs import QUEUED, Job, new_id, now_ms
from taskd.store import Store
from tests.support import (
    DEADLINE,
    REPO,
    DaemonApi,
    base_url,
    get_json,
    post_json,
    wait_for_state,
    wait_until,
)

pytest.importorskip("selenium", reason="needs selenium (the `test` extra) to drive Chromium")

from selenium import webdriver
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs a headless Chromium: apt-get install chromium chromium-driver (Debian)",
)

TOKEN = "dashboard-secret-0123456789"
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
]
# What the page shows where a value does not apply, or there is no data yet: an en dash.
DASH = "\u2013"
# What the screenshot test writes into the repository for the README, when asked to.
SCREENSHOT = REPO / "docs" / "dashboard.png"

T = TypeVar("T")


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    """A fresh headless Chromium with its own profile, its console log recorded."""
    assert CHROMIUM is not None
    assert CHROMEDRIVER is not None
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


async def in_browser(fn: Callable[..., T], *args: Any) -> T:
    """Run blocking Selenium work in a thread, so the daemon on this loop keeps serving."""
    return await anyio.to_thread.run_sync(functools.partial(fn, *args))


def wait_for(driver: WebDriver, condition: Callable[[WebDriver], Any], what: str) -> Any:
    """Poll the page until `condition` is truthy; rows replaced meanwhile are retried."""
    waiter = WebDriverWait(
        driver,
        DEADLINE,
        poll_frequency=0.05,
        # ValueError: a number cell that shows a dash until there is data.
        ignored_exceptions=(NoSuchElementException, StaleElementReferenceException, ValueError),
    )
    return waiter.until(condition, message=f"timed out after {DEADLINE} s waiting for {what}")


def queue_cell(driver: WebDriver, queue: str, column: str) -> WebElement:
    return driver.find_element(
        By.CSS_SELECTOR, f'#queues-body tr[data-key="{queue}"] [data-col="{column}"]'
    )


def queue_count(driver: WebDriver, queue: str, column: str) -> int:
    return int(queue_cell(driver, queue, column).text.replace(",", ""))


def row_cell(driver: WebDriver, table: str, key: str, column: str) -> WebElement:
    """A cell of a table's row, the row found by its data-key (a job's id, say)."""
    return driver.find_element(
        By.CSS_SELECTOR, f'#{table}-body tr[data-key="{key}"] [data-col="{column}"]'
    )


def open_page(driver: WebDriver, url: str) -> None:
    """Load the page and wait until the stream is live and the default queue is shown."""
    driver.get(url)
    wait_for(
        driver,
        lambda d: d.find_element(By.ID, "conn").get_attribute("data-state") == "live",
        "the connection state to become live",
    )
    wait_for(driver, lambda d: queue_cell(d, "default", "name").text == "default", "default")


def console_errors(driver: WebDriver) -> list[str]:
    """The SEVERE entries of the browser console since the last call."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def submit_form(driver: WebDriver, job_type: str, payload: str, delay: str = "") -> str:
    """Fill in and send the page's form; the text it answers with."""
    for field, value in (("job-type", job_type), ("job-payload", payload), ("job-delay", delay)):
        element = driver.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    before = driver.find_element(By.ID, "submit-result").text
    driver.find_element(By.ID, "submit-button").click()
    return str(
        wait_for(
            driver,
            lambda d: (
                (text := d.find_element(By.ID, "submit-result").text) != before
                and text != "Submitting…"
                and text
            ),
            "the form's answer",
        )
    )


def too_wide(driver: WebDriver, width: int) -> list[str]:
    """The elements sticking out past `width` px (outside scrolling boxes): what to fix."""
    return list(
        driver.execute_script(
            """
            const out = [];
            for (const el of document.querySelectorAll("body *")) {
              // A scrolling box clips what it holds, unless it is placed absolutely.
              const clipped = el.parentElement.closest(".scroll");
              if (clipped && getComputedStyle(el).position !== "absolute") continue;
              const right = el.getBoundingClientRect().right;
              if (right > arguments[0] + 1) out.push(`${el.tagName}#${el.id} ${right}`);
            }
            return out.slice(0, 10);
            """,
            width,
        )
    )


def set_viewport(driver: WebDriver, width: int, height: int, *, mobile: bool = False) -> None:
    """Emulate a screen of this size, as DevTools' device mode does."""
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {
            "width": width,
            "height": height,
            "deviceScaleFactor": 2 if mobile else 1,
            "mobile": mobile,
        },
    )


# ---------------------------------------------------------------- tests


async def test_the_page_loads_live_without_console_errors(
    daemon: Daemon, browser: WebDriver
) -> None:
    url = base_url(daemon)

    def check() -> None:
        open_page(browser, f"{url}/")
        assert browser.title == "taskd"
        daemons = browser.find_element(By.ID, "daemons-body")
        wait_for(browser, lambda d: daemon.identity.id in daemons.text, "this daemon's row")
        # Beside the daemons, the fleet's sizing hint: nothing waits, one daemon will do.
        hint = browser.find_element(By.ID, "autoscale")
        wait_for(browser, lambda d: hint.get_attribute("data-desired") == "1", "the sizing hint")
        assert hint.is_displayed()
        assert hint.text.startswith("Sizing hint: 1 daemon (1 live; 1 to 10) · backlog 0 ·")
        assert "nothing waits (target 60 s)" in hint.text
        # No handler has limits: no Limits card; every type has a daemon: no No handler card.
        assert not browser.find_element(By.ID, "limits").is_displayed()
        assert not browser.find_element(By.ID, "unhandled").is_displayed()
        # No [archive]: the History card says so, and offers nothing to search.
        off = browser.find_element(By.ID, "history-off")
        wait_for(browser, lambda d: off.is_displayed(), "the History card to say: no archive")
        assert not browser.find_element(By.ID, "history-form").is_displayed()
        assert console_errors(browser) == []

    await in_browser(check)


async def test_a_job_submitted_through_the_form_runs_and_the_counts_follow(
    daemon: Daemon, browser: WebDriver
) -> None:
    url = base_url(daemon)

    def check() -> None:
        open_page(browser, f"{url}/")
        completed = queue_count(browser, "default", "completed")

        # Bad JSON is refused in the page, with a message, before anything is sent.
        browser.find_element(By.ID, "job-type").send_keys("echo")
        browser.find_element(By.ID, "job-payload").send_keys("{x: 1}")
        browser.find_element(By.ID, "submit-button").click()
        error = browser.find_element(By.ID, "payload-error")
        wait_for(browser, lambda d: error.is_displayed(), "the payload's error message")
        assert "not valid JSON" in error.text

        # The API's own message is shown when it refuses the job.
        assert "unknown job type 'resize'" in submit_form(browser, "resize", "")

        answer = submit_form(browser, "echo", '{"x":1}')
        assert answer.startswith("Submitted"), answer
        assert not error.is_displayed()
        wait_for(
            browser,
            lambda d: queue_count(d, "default", "completed") > completed,
            "the completed count of default to grow",
        )
        job_id = browser.find_element(By.ID, "submit-result").get_attribute("data-job-id")
        row = f'#recent-body tr[data-key="{job_id}"]'
        wait_for(
            browser,
            lambda d: (
                d.find_element(By.CSS_SELECTOR, row).get_attribute("data-state") == "completed"
            ),
            "the job to show completed among the recent jobs",
        )
        # The refused submission (422) is the only error the console saw.
        assert all("422" in message for message in console_errors(browser))

    await in_browser(check)
    async with aiohttp.ClientSession() as session:
        _, stats = await get_json(session, f"{url}/stats")
    assert stats["queues"]["default"]["totals"]["enqueued"] == 1  # the bad JSON never went


async def test_pause_and_resume_through_the_page(daemon: Daemon, browser: WebDriver) -> None:
    url = base_url(daemon)

    def click_and_wait(action: str, badge: str) -> None:
        button = queue_cell(browser, "default", "action").find_element(By.TAG_NAME, "button")
        assert button.get_attribute("data-action") == action
        button.click()
        wait_for(
            browser,
            lambda d: queue_cell(d, "default", "status").text == badge,
            f"the badge to read {badge}",
        )

    async def paused() -> bool:
        async with aiohttp.ClientSession() as session:
            _, stats = await get_json(session, f"{url}/stats")
        return bool(stats["queues"]["default"]["paused"])

    await in_browser(open_page, browser, f"{url}/")
    assert await in_browser(lambda: queue_cell(browser, "default", "status").text) == "running"

    await in_browser(click_and_wait, "pause", "paused")
    assert await paused()

    await in_browser(click_and_wait, "resume", "running")
    assert not await paused()
    assert await in_browser(console_errors, browser) == []


async def test_with_a_token_the_page_needs_it_and_works_with_it(
    daemon_api: DaemonApi, browser: WebDriver
) -> None:
    async with daemon_api(server={"token": TOKEN}) as (_, (session, url)):
        async with session.get(f"{url}/events") as response:
            assert response.status == 401

        def check() -> None:
            # The page asks for the token, and keeps it in this tab (not in the URL).
            browser.get(f"{url}/")
            wait_for(
                browser,
                lambda d: d.find_element(By.ID, "token-form").is_displayed(),
                "the page to ask for the token",
            )
            assert browser.find_element(By.ID, "conn").get_attribute("data-state") == "needs_token"
            # The refusal that made it ask is the only complaint in the console.
            [refusal] = console_errors(browser)
            assert "/events" in refusal
            assert "401" in refusal
            browser.find_element(By.ID, "token-input").send_keys(TOKEN + "\n")
            open_page(browser, f"{url}/")  # a reload keeps the token: the tab remembers it
            assert not browser.find_element(By.ID, "token-form").is_displayed()
            assert "token" not in browser.current_url
            completed = queue_count(browser, "default", "completed")
            answer = submit_form(browser, "echo", '{"x":1}')
            assert answer.startswith("Submitted"), answer
            wait_for(
                browser,
                lambda d: queue_count(d, "default", "completed") > completed,
                "the completed count of default to grow",
            )
            assert console_errors(browser) == []
            # Close the page before the daemon stops, so its stream does not hold it up.
            browser.get("about:blank")

        await in_browser(check)


async def test_limits_waits_and_priorities_are_shown(
    daemon_api: DaemonApi, browser: WebDriver, tmp_path: Path
) -> None:
    """A type allowed one start an hour: of 3 jobs one runs, 2 wait, and the page says so."""
    limited = {"limited": {"builtin": "echo", "rate_limit": "1/h"}}
    async with daemon_api(handlers=limited) as (_, (session, url)):
        priorities = {}
        for priority in (8, 2, None):  # None: the default, 5
            body: dict[str, Any] = {"type": "limited", "payload": {"p": priority}}
            if priority is not None:
                body["priority"] = priority
            status, job = await post_json(session, f"{url}/jobs", body)
            assert status == 201, job
            priorities[job["id"]] = 5 if priority is None else priority
        jobs = [
            await wait_for_state(session, url, job_id, {"completed", "scheduled"})
            for job_id in priorities
        ]
        waiting = [job["id"] for job in jobs if job["state"] == "scheduled"]
        assert len(waiting) == 2, jobs
        assert all(job["waiting_for"] == "rate_limit" for job in jobs if job["id"] in waiting)

        def check() -> None:
            open_page(browser, f"{url}/")
            # The queue counts the waits, and the Limits card shows the type's limits.
            wait_for(
                browser,
                lambda d: queue_count(d, "default", "rate_limited") == 2,
                "the queue's rate-limited waits to read 2",
            )
            assert queue_count(browser, "default", "concurrency_limited") == 0
            assert browser.find_element(By.ID, "limits").is_displayed()
            limit = functools.partial(row_cell, browser, "limits", "default/limited")
            wait_for(
                browser,
                lambda d: limit("rate_limited").text == "2",
                "the Limits card to count 2 rate-limited waits",
            )
            shown = {
                column: limit(column).text
                for column in ("type", "queue", "rate", "started", "concurrency", "held")
            }
            assert shown == {
                "type": "limited",
                "queue": "default",
                "rate": "1/h",
                "started": "1",
                "concurrency": DASH,
                "held": DASH,
            }
            assert limit("concurrency_limited").text == "0"
            # Every job's priority, and why the waiting ones wait.
            for job_id, priority in priorities.items():
                job = functools.partial(row_cell, browser, "recent", job_id)
                wait_for(
                    browser,
                    lambda d, job=job, priority=priority: job("priority").text == str(priority),
                    f"job {job_id} to show priority {priority}",
                )
                row = browser.find_element(By.CSS_SELECTOR, f'#recent-body tr[data-key="{job_id}"]')
                if job_id in waiting:
                    assert row.get_attribute("data-waiting-for") == "rate_limit"
                    assert job("state").text == "scheduled waits for rate limit"
                else:
                    assert row.get_attribute("data-waiting-for") == ""
                    assert job("state").text == "completed"
            # At phone width the new columns and card scroll in their boxes, not the page.
            set_viewport(browser, 375, 812, mobile=True)
            assert browser.execute_script("return document.body.scrollWidth") <= 376, too_wide(
                browser, 375
            )
            assert console_errors(browser) == []
            browser.save_screenshot(str(tmp_path / "dashboard-limits-phone.png"))
            # Close the page before the daemon stops, so its stream does not hold it up.
            browser.get("about:blank")

        await in_browser(check)


async def test_job_types_no_daemon_can_run_and_each_daemons_types_are_shown(
    daemon: Daemon, browser: WebDriver, redis_url: str
) -> None:
    url = base_url(daemon)
    store = Store.from_url(redis_url, prefix="taskd")
    stranded = Job(new_id(), "resize", "default", None, QUEUED, 0, now_ms())
    try:
        await store.enqueue(stranded)  # as a daemon with the handler, since gone, would
    finally:
        await store.close()

    def check() -> None:
        open_page(browser, f"{url}/")
        row = functools.partial(row_cell, browser, "unhandled", "default/resize")
        wait_for(browser, lambda d: row("job").text != "", "the No handler card's row")
        assert browser.find_element(By.ID, "unhandled").is_displayed()
        assert (row("type").text, row("queue").text) == ("resize", "default")
        assert row("job").get_attribute("title") == stranded.id
        mine = functools.partial(row_cell, browser, "daemons", daemon.identity.id)
        assert mine("types").text == "echo, fail, noop, sleep"
        set_viewport(browser, 375, 812, mobile=True)
        assert browser.execute_script("return document.body.scrollWidth") <= 376, too_wide(
            browser, 375
        )
        assert console_errors(browser) == []
        browser.get("about:blank")

    await in_browser(check)


def job_ids(driver: WebDriver) -> set[str]:
    """The ids the job list shows."""
    rows = driver.find_elements(By.CSS_SELECTOR, "#recent-body tr")
    return {str(row.get_attribute("data-key")) for row in rows}


def filter_jobs(driver: WebDriver, state: str = "", **fields: str) -> None:
    """Set the job list's filters (the others emptied) and apply them."""
    Select(driver.find_element(By.ID, "jobs-state")).select_by_value(state)
    for name in ("type", "queue"):
        element = driver.find_element(By.ID, f"jobs-{name}")
        element.clear()
        element.send_keys(fields.get(name, ""))
    driver.find_element(By.ID, "jobs-filter").click()


async def test_the_job_list_filters_by_state_type_and_queue_and_looks_a_job_up(
    daemon_api: DaemonApi, browser: WebDriver
) -> None:
    images = {"thumbnail": {"builtin": "echo", "queue": "images"}}
    started = daemon_api(workers={"queues": ["default", "images"]}, handlers=images)
    async with started as (_, (session, url)):

        async def submit(body: dict[str, Any], state: str) -> str:
            status, job = await post_json(session, f"{url}/jobs", body)
            assert status == 201, job
            return str((await wait_for_state(session, url, job["id"], {state}))["id"])

        later = [await submit({"type": "echo", "delay": 3600}, "scheduled") for _ in range(2)]
        thumbnail = await submit({"type": "thumbnail", "delay": 3600}, "scheduled")
        failed = await submit({"type": "fail", "max_attempts": 1}, "failed")
        done = await submit({"type": "echo", "payload": {"x": 1}}, "completed")

        def check() -> None:
            open_page(browser, f"{url}/")
            wait_for(browser, lambda d: done in job_ids(d), "the latest jobs")
            filter_jobs(browser, "scheduled")
            wanted = {*later, thumbnail}
            wait_for(browser, lambda d: job_ids(d) == wanted, "the scheduled jobs only")
            scope = browser.find_element(By.ID, "recent-scope")
            assert scope.text == "matching state scheduled"
            filter_jobs(browser, "scheduled", type="thumbnail")
            wait_for(browser, lambda d: job_ids(d) == {thumbnail}, "the thumbnails only")
            filter_jobs(browser, queue="default", type="echo")
            wait_for(browser, lambda d: job_ids(d) == {*later, done}, "the echo jobs of default")
            filter_jobs(browser, queue="nowhere")
            empty = browser.find_element(By.ID, "recent-empty")
            wait_for(browser, lambda d: empty.is_displayed(), "no job to match")
            assert empty.text == "No job matches."
            # Filtered, the list follows the stream still.
            filter_jobs(browser, "failed")
            wait_for(browser, lambda d: job_ids(d) == {failed}, "the failed job")

        await in_browser(check)
        another = await submit({"type": "fail", "max_attempts": 1}, "failed")

        def check_more() -> None:
            wait_for(browser, lambda d: job_ids(d) == {failed, another}, "the new failure")
            clear = browser.find_element(By.ID, "jobs-clear")
            clear.click()
            wait_for(browser, lambda d: done in job_ids(d), "the latest jobs again")
            assert not clear.is_displayed()
            assert browser.find_element(By.ID, "recent-scope").text == "latest 20"
            # One job by its id, whole; an unknown id gets the API's word.
            lookup = browser.find_element(By.ID, "lookup-id")
            lookup.send_keys(done + "\n")
            shown = browser.find_element(By.ID, "lookup-job")
            wait_for(browser, lambda d: shown.is_displayed(), "the job's document")
            assert f'"id": "{done}"' in shown.text
            assert '"state": "completed"' in shown.text
            lookup.clear()
            lookup.send_keys("0190a000-0000-7000-8000-000000000000\n")
            error = browser.find_element(By.ID, "jobs-error")
            wait_for(browser, lambda d: "no job with id" in error.text, "the lookup's error")
            assert not shown.is_displayed()
            # The unknown id (404) is the only error the console saw.
            assert all("404" in message for message in console_errors(browser))
            set_viewport(browser, 375, 812, mobile=True)
            assert browser.execute_script("return document.body.scrollWidth") <= 376, too_wide(
                browser, 375
            )
            browser.get("about:blank")

        await in_browser(check_more)


async def test_a_purge_asks_for_the_queue_name_and_a_bulk_retry_asks_first(
    daemon_api: DaemonApi, browser: WebDriver
) -> None:
    images = {"thumbnail": {"builtin": "echo", "queue": "images"}}
    started = daemon_api(workers={"queues": ["default", "images"]}, handlers=images)
    async with started as (_, (session, url)):
        later = [{"type": "echo", "delay": 3600, "payload": n} for n in range(25)]
        later += [{"type": "thumbnail", "delay": 3600} for _ in range(3)]
        later += [{"type": "fail", "max_attempts": 1} for _ in range(2)]
        status, body = await post_json(session, f"{url}/jobs/batch", {"jobs": later})
        assert status == 201, body
        for job_id in body["ids"][-2:]:
            await wait_for_state(session, url, job_id, {"failed"})
        await post_json(session, f"{url}/queues/default/pause", {})  # retried jobs wait

        def check() -> None:
            open_page(browser, f"{url}/")
            wait_for(browser, lambda d: queue_count(d, "default", "scheduled") == 25, "25 jobs")
            dialog = browser.find_element(By.ID, "purge-dialog")
            confirm = browser.find_element(By.ID, "purge-confirm")
            purge = browser.find_element(By.ID, "purge-submit")

            def open_purge() -> None:
                action = queue_cell(browser, "default", "action")
                action.find_element(By.CSS_SELECTOR, '[data-action="purge"]').click()
                wait_for(browser, lambda d: dialog.is_displayed(), "the purge dialog")
                Select(browser.find_element(By.ID, "purge-state")).select_by_value("scheduled")

            # Cancelled, it deletes nothing.
            open_purge()
            assert browser.find_element(By.ID, "purge-queue").text == "default"
            assert browser.find_element(By.ID, "purge-count").text == "25 scheduled now."
            browser.find_element(By.ID, "purge-cancel").click()
            wait_for(browser, lambda d: not dialog.is_displayed(), "the dialog to close")
            # It goes only once the queue's name is typed whole.
            open_purge()
            confirm.send_keys("defaul")
            assert not purge.is_enabled()
            confirm.send_keys("t")
            assert purge.is_enabled()
            purge.click()
            notice = browser.find_element(By.ID, "notice")
            wait_for(
                browser,
                lambda d: notice.text == "Queue default: 25 scheduled jobs purged",
                "the purge's answer",
            )
            assert not dialog.is_displayed()
            wait_for(browser, lambda d: queue_count(d, "default", "scheduled") == 0, "0 left")
            assert queue_count(browser, "images", "scheduled") == 3

            # The dead letters of a type, back on their queue after a dialog.
            retry = browser.find_element(By.ID, "retry-all")
            wait_for(browser, lambda d: retry.is_displayed(), "the bulk retry's button")
            retry.click()
            retry_dialog = browser.find_element(By.ID, "retry-dialog")
            wait_for(browser, lambda d: retry_dialog.is_displayed(), "the retry dialog")
            browser.find_element(By.ID, "retry-type").send_keys("fail")
            summary = browser.find_element(By.ID, "retry-summary").text
            assert summary == "Retries every failed job of type fail of every queue."
            browser.find_element(By.ID, "retry-submit").click()
            wait_for(
                browser,
                lambda d: notice.text == "2 dead letters back on their queues",
                "the bulk retry's answer",
            )
            assert not retry_dialog.is_displayed()
            wait_for(browser, lambda d: queue_count(d, "default", "queued") == 2, "2 queued")
            assert console_errors(browser) == []
            browser.get("about:blank")

        await in_browser(check)
        _, stats = await get_json(session, f"{url}/stats")
        default, other = stats["queues"]["default"], stats["queues"]["images"]
        assert (default["scheduled"], default["failed"], other["scheduled"]) == (0, 0, 3)


def history_ids(driver: WebDriver) -> list[str]:
    """The ids the History card lists, top to bottom."""
    rows = driver.find_elements(By.CSS_SELECTOR, "#history-body tr")
    return [str(row.get_attribute("data-id")) for row in rows]


def search_history(driver: WebDriver, **fields: str) -> None:
    """Fill in the History card's filters (the others emptied) and search."""
    for name in ("type", "queue", "since", "until", "q"):
        element = driver.find_element(By.ID, f"history-{name}")
        element.clear()
        element.send_keys(fields.get(name, ""))
    driver.find_element(By.ID, "history-search").click()


@pytest.mark.timeout(120)
async def test_the_history_lists_archived_jobs_filters_them_and_pages(
    daemon_api: DaemonApi, browser: WebDriver, archive_url: str, tmp_path: Path
) -> None:
    async with daemon_api(archive={"url": archive_url}) as (_, (session, url)):
        echoes = [{"type": "echo", "payload": {"n": n, "tag": "ab"[n % 2]}} for n in range(25)]
        fails = [{"type": "fail", "payload": {"n": n}, "max_attempts": 1} for n in range(3)]
        status, body = await post_json(session, f"{url}/jobs/batch", {"jobs": echoes + fails})
        assert status == 201, body
        archived: list[dict[str, Any]] = []

        async def all_archived() -> bool:
            nonlocal archived
            _, page = await get_json(session, f"{url}/archive?limit=1000")
            archived = page.get("jobs", [])
            return len(archived) == 28

        await wait_until(all_archived, "28 jobs in the archive")
        newest_first = [job["id"] for job in archived]
        failed = [job["id"] for job in archived if job["type"] == "fail"]
        tagged_a = [job["id"] for job in archived if job["payload"].get("tag") == "a"]
        assert (len(failed), len(tagged_a)) == (3, 13)

        def check() -> None:
            open_page(browser, f"{url}/")
            more = browser.find_element(By.ID, "history-more")
            # A page of 20, newest first, then the rest through "More".
            wait_for(browser, lambda d: len(history_ids(d)) == 20, "the history's first page")
            assert history_ids(browser) == newest_first[:20]
            assert more.is_displayed()
            more.click()
            wait_for(browser, lambda d: len(history_ids(d)) == 28, "the history's second page")
            assert history_ids(browser) == newest_first
            assert not more.is_displayed()

            search_history(browser, type="fail")
            wait_for(browser, lambda d: history_ids(d) == failed, "the failed jobs only")
            search_history(browser, q='{"tag": "a"}')
            wait_for(browser, lambda d: history_ids(d) == tagged_a, "the jobs tagged a")
            # Times as people type them, in the browser's time zone.
            search_history(browser, type="fail", since="2000-01-01 00:00")
            wait_for(browser, lambda d: history_ids(d) == failed, "the failed jobs since 2000")
            empty = browser.find_element(By.ID, "history-empty")
            assert not empty.is_displayed()
            search_history(browser, type="fail", until="2000-01-01 00:00")
            wait_for(browser, lambda d: empty.is_displayed(), "no job to finish before 2000")
            assert history_ids(browser) == []
            # Bad JSON is caught in the page; the API's own word on a bad time is shown.
            error = browser.find_element(By.ID, "history-error")
            search_history(browser, q="{tag: a}")
            wait_for(browser, lambda d: "not valid JSON" in error.text, "the filter's error")
            search_history(browser, since="yesterday")
            wait_for(
                browser,
                lambda d: "'since' is not an RFC 3339 time" in error.text,
                "the API's error",
            )

            # A job's whole document, shown when its row is clicked.
            search_history(browser, type="fail")
            wait_for(browser, lambda d: history_ids(d) == failed, "the failed jobs again")
            assert not error.is_displayed()
            row = browser.find_element(By.CSS_SELECTOR, f'#history-body tr[data-id="{failed[0]}"]')
            row.find_element(By.CSS_SELECTOR, '[data-action="show"]').click()
            shown = browser.find_element(By.ID, "history-job")
            wait_for(browser, lambda d: shown.is_displayed(), "the job's document")
            assert f'"id": "{failed[0]}"' in shown.text
            assert '"archived": true' in shown.text
            assert '"state": "failed"' in shown.text

            set_viewport(browser, 375, 812, mobile=True)
            assert browser.execute_script("return document.body.scrollWidth") <= 376, too_wide(
                browser, 375
            )
            # The refused time (400) is the only error the console saw.
            assert all("400" in message for message in console_errors(browser))
            browser.save_screenshot(str(tmp_path / "dashboard-history-phone.png"))
            browser.get("about:blank")

        await in_browser(check)


async def test_at_phone_width_the_page_does_not_scroll_sideways(
    daemon: Daemon, browser: WebDriver, tmp_path: Path
) -> None:
    url = base_url(daemon)
    async with aiohttp.ClientSession() as session:
        # Long cells: a failed job with a 300-character error, shown among the failures.
        _, failed = await post_json(
            session,
            f"{url}/jobs",
            {"type": "fail", "payload": {"message": "x" * 300}, "max_attempts": 1},
        )
        await post_json(session, f"{url}/jobs", {"type": "echo", "payload": {"x": 1}})

    def check() -> None:
        set_viewport(browser, 375, 812, mobile=True)
        open_page(browser, f"{url}/")
        wait_for(
            browser,
            lambda d: d.find_element(
                By.CSS_SELECTOR, f'#failed-body tr[data-key="{failed["id"]}"]'
            ),
            "the failed job's row",
        )
        # A mobile viewport widens itself to fit content that overflows: it must not.
        width = browser.execute_script("return window.innerWidth")
        assert width == 375, f"the page widened to {width} px by {too_wide(browser, 375)}"
        for element in ("document.body", "document.documentElement"):
            scroll_width = browser.execute_script(f"return {element}.scrollWidth")
            assert scroll_width <= width + 1, f"{element} is {scroll_width} px wide"
        # The wide tables scroll inside their own boxes instead.
        queues_box = browser.find_element(By.CSS_SELECTOR, "#queues .scroll")
        assert browser.execute_script("return arguments[0].clientWidth", queues_box) <= width
        assert console_errors(browser) == []
        height = browser.execute_script("return document.documentElement.scrollHeight")
        set_viewport(browser, 375, int(height), mobile=True)
        browser.save_screenshot(str(tmp_path / "dashboard-phone.png"))

    await in_browser(check)


@pytest.mark.timeout(120)
async def test_a_screenshot_with_data(
    daemon_api: DaemonApi, browser: WebDriver, tmp_path: Path
) -> None:
    """Two busy queues, then a running job, a scheduled one and failures; a full-page shot.

    With TASKD_SCREENSHOT=1 it is also written to docs/dashboard.png, for the README.
    """
    started = daemon_api(
        workers={"queues": ["default", "images"]},
        # Thumbnails come 2 a second, over their rate limit: some wait, as the page shows.
        handlers={"thumbnail": {"builtin": "echo", "queue": "images", "rate_limit": "1/s"}},
    )
    async with started as (_, (session, url)), anyio.create_task_group() as tg:

        async def submit(body: dict[str, Any]) -> None:
            status, job = await post_json(session, f"{url}/jobs", body)
            assert status == 201, job

        stop_trickle = anyio.Event()

        async def trickle() -> None:
            """A steady stream of work, so the charts have lines to draw."""
            n = 0
            while not stop_trickle.is_set():
                n += 1
                await submit({"type": "echo", "payload": {"n": n}})
                if n % 2:
                    await submit({"type": "thumbnail", "payload": {"image": n}})
                with anyio.move_on_after(0.25):
                    await stop_trickle.wait()

        def wait_for_charts() -> None:
            open_page(browser, f"{url}/")
            # A throughput bucket is 10 s: wait for a full one, and for 20 points of history.
            wait_for(
                browser,
                lambda d: (
                    float(queue_cell(d, "default", "throughput").text) > 0
                    and int(d.find_element(By.ID, "chart-wait").get_attribute("data-points") or 0)
                    >= 20
                ),
                "throughput to show and the charts to fill",
            )

        tg.start_soon(trickle)
        try:
            await in_browser(wait_for_charts)
        finally:
            stop_trickle.set()

        # Last, so that they are among the recent jobs: one of each kind worth showing.
        for message in ("upstream answered 503", "no such file: /data/in/4711.jpg"):
            await submit({"type": "fail", "payload": {"message": message}, "max_attempts": 1})
        await submit({"type": "echo", "payload": {"hello": "world"}, "delay": 3600})
        await submit({"type": "sleep", "payload": {"seconds": 60}, "priority": 8})

        def shoot() -> bytes:
            recent = "#recent-body tr[data-state={}]"
            wait_for(
                browser,
                lambda d: (
                    d.find_elements(By.CSS_SELECTOR, recent.format("active"))
                    and d.find_elements(By.CSS_SELECTOR, recent.format("scheduled"))
                    and len(d.find_elements(By.CSS_SELECTOR, "#failed-body tr")) == 2
                ),
                "a running, a scheduled and two failed jobs on the page",
            )
            height = browser.execute_script("return document.documentElement.scrollHeight")
            set_viewport(browser, 1280, int(height))
            assert console_errors(browser) == []
            png = browser.get_screenshot_as_png()
            browser.get("about:blank")
            return bytes(png)

        png = await in_browser(shoot)

    assert png.startswith(b"\x89PNG")
    (tmp_path / "dashboard.png").write_bytes(png)
    if os.environ.get("TASKD_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(exist_ok=True)
        SCREENSHOT.write_bytes(png)
