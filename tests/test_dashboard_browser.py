"""The dashboard in a real browser: Debian's chromium, headless, driven by Playwright.

One browser for the module; each test gets its own context (closed at its end) and its own server
(``tests/dashboard_app.py``: the example app plus a controller whose task echoes hostile text) on
127.0.0.1 with a SQLite store in the test's temporary directory. Screenshots go to that directory.
"""
from __future__ import annotations

import json
import re
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from conftest import free_port
from serverproc import Server, ServerPool, poll_until, python

APP = Path(__file__).resolve().parent / "dashboard_app.py"
#: Milliseconds the page gets to show what a test waits for.
SHOWN = 20_000

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    binary = shutil.which("chromium")
    if binary is None:
        pytest.fail("chromium is not installed: run the README's test command, which installs it.")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=binary, args=["--no-sandbox"])
        # The browser starts its shared helper processes (GPU, network, storage) on first use: start
        # them now, so that each test's leak detector sees only what that test's own page left.
        warm = chromium.new_context()
        warm.new_page().goto("data:text/html,<p>ready</p>")
        warm.close()
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh page in its own context; any script error or Content-Security-Policy violation fails the test.

    An indirect parameter gives more options of the context (``timezone_id``, ...)."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, **getattr(request, "param", {}))
    opened = context.new_page()
    opened.set_default_timeout(SHOWN)
    errors: list[str] = []
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    opened.on("console", lambda message: errors.append(message.text)
              if "Content Security Policy" in message.text else None)
    opened.on("dialog", lambda dialog: dialog.accept())
    yield opened
    try:
        save_screenshot(opened, tmp_path / "last.png")
    finally:
        context.close()
    assert errors == [], errors


def save_screenshot(page: Any, path: Path) -> None:
    """Write a screenshot of ``page`` ourselves: Playwright would write it from a worker thread of its
    event loop, a thread that outlives the test (the leak detector would rightly count it)."""
    path.write_bytes(page.screenshot())


def start(pool: ServerPool, tmp_path: Path, port: int, **env: str) -> Server:
    return pool.start(python(str(APP)), cwd=tmp_path, port=port, log_path=tmp_path / "server.log",
                      ready_path="/mpc/health",
                      env={"PORT": str(port), "MPC_STORE_URL": f"sqlite:///{tmp_path}/tasks.sqlite3", **env})


@pytest.fixture
def server(pool: ServerPool, tmp_path: Path) -> Server:
    return start(pool, tmp_path, free_port())


def submit(server: Server, path: str, **kwargs: Any) -> str:
    answer = requests.post(server.base + path, json=kwargs, timeout=10)
    assert answer.status_code == 202, answer.text
    return str(answer.json()["uuid"])


def row(uuid: str) -> str:
    return f'#task-rows tr[data-uuid="{uuid}"]'


def test_the_list_shows_controllers_and_a_progress_bar_that_advances(page: Any, server: Server) -> None:
    uuid = submit(server, "/primes", limit=100_000, chunks=25, pause=0.12)
    page.goto(server.base + "/mpc/")
    page.wait_for_selector('#controllers [data-controller="primes"]')
    page.wait_for_selector(row(uuid))
    assert uuid[:8] in page.inner_text(row(uuid))
    page.wait_for_selector("#connection.up")
    first = page.wait_for_function(
        f"() => {{ const bar = document.querySelector('{row(uuid)} progress');"
        f" return bar && bar.value > 0 && bar.value < 100 ? bar.value : false; }}").json_value()
    page.wait_for_function(f"() => document.querySelector('{row(uuid)} progress').value > {first}")
    page.wait_for_selector(f"{row(uuid)} td.latest:has-text('checked_below')")
    page.wait_for_selector(f'{row(uuid)}[data-status="succeeded"]')
    assert page.locator(f"{row(uuid)} progress").evaluate("bar => bar.value") == 100
    page.wait_for_selector("#chart rect.fill-succeeded")  # the chart counts the task that ended


def test_pause_resume_and_stop_on_the_task_page(page: Any, server: Server, tmp_path: Path) -> None:
    uuid = submit(server, "/echo", text="waiting", gate=str(tmp_path / "never"))
    page.goto(server.base + f"/mpc/#/tasks/{uuid}")
    page.wait_for_selector("#task-status.status-running")
    page.wait_for_selector("#task-log:has-text('echo waiting')")
    assert page.inner_text("#task-uuid") == uuid
    page.click("#task-actions button.pause")
    page.wait_for_selector("#task-status.status-paused")
    page.click("#task-actions button.resume")
    page.wait_for_selector("#task-status.status-running")
    page.click("#task-actions button.stop")  # the confirmation is accepted by the page fixture
    page.wait_for_selector("#task-status.status-stopped")
    assert requests.get(f"{server.base}/mpc/api/tasks/{uuid}", timeout=10).json()["status"] == "stopped"
    assert page.locator("#task-actions button.stop").count() == 0, "nothing left to stop"


def test_finish_now_on_the_task_page_keeps_the_count_so_far(page: Any, server: Server) -> None:
    uuid = submit(server, "/primes", limit=100_000, chunks=100, pause=0.2)
    page.goto(server.base + f"/mpc/#/tasks/{uuid}")
    page.wait_for_selector("#task-status.status-running")
    page.wait_for_selector("#task-progress-text:has-text('checked_below')")
    page.click("#task-actions button.finish")  # the confirmation is accepted by the page fixture
    page.wait_for_selector("#task-status.status-stopped")
    task = requests.get(f"{server.base}/mpc/api/tasks/{uuid}", timeout=10).json()
    assert task["stopped_with_result"] is True and 0 < task["result"]["checked_below"] < 100_000, task
    page.wait_for_selector("#task-fields dt:has-text('Finished early')")
    assert json.loads(page.inner_text("#task-result")) == task["result"]
    assert page.locator("#task-actions button.finish").count() == 0, "nothing left to finish"


HOSTILE = '<script>window.pwned = "script"</script><img src=x onerror="window.pwned = \'img\'">'


def test_hostile_text_is_shown_as_text_and_nothing_runs(page: Any, server: Server) -> None:
    shown = submit(server, "/echo", text=HOSTILE)
    failed = submit(server, "/echo", text=HOSTILE, fail=True)
    page.goto(server.base + "/mpc/")
    page.wait_for_selector(f'{row(shown)}[data-status="succeeded"]')
    page.wait_for_selector(f'{row(failed)}[data-status="failed"]')
    assert page.inner_text(f"{row(shown)} td.latest") == HOSTILE
    page.goto(server.base + f"/mpc/#/tasks/{failed}")
    page.wait_for_selector("#task-status.status-failed")
    page.wait_for_selector("#task-log:has-text('echo <script>')")
    assert json.loads(page.inner_text("#task-args")) == {"text": HOSTILE, "fail": True}
    assert page.inner_text("#task-error") == f"ValueError: {HOSTILE}"
    assert page.inner_text("#task-progress-text") == HOSTILE
    assert "MPC_EXPOSE_TRACEBACKS" in page.inner_text("#task-traceback-note"), "the page says the traceback is hidden"
    # ... and where it is: the task's log on this page, and the server's log.
    assert "in the task's log below and in the server's log" in page.inner_text("#task-traceback-note")
    page.wait_for_selector("#task-log:has-text('Traceback (most recent call last)')")
    assert "raise ValueError(text)" in page.inner_text("#task-log")
    assert f"Task {failed} ended failed: ValueError" in server.log() and "raise ValueError(text)" in server.log()
    assert page.evaluate("window.pwned") is None
    assert page.locator("main img, main script").count() == 0, "no element was made from the text"


def test_the_page_recovers_after_the_server_restarts(page: Any, pool: ServerPool, tmp_path: Path) -> None:
    port = free_port()
    first = start(pool, tmp_path, port)
    before = submit(first, "/echo", text="before")
    page.goto(first.base + "/mpc/")
    page.wait_for_selector(f'{row(before)}[data-status="succeeded"]')
    page.wait_for_selector("#connection.up")
    assert first.stop() == []
    page.wait_for_selector("#connection.down")
    assert "disconnected" in page.inner_text("#connection")
    save_screenshot(page, tmp_path / "disconnected.png")
    second = start(pool, tmp_path, port)
    page.wait_for_selector("#connection.up")
    after = submit(second, "/echo", text="after")
    page.wait_for_selector(f'{row(after)}[data-status="succeeded"]')
    assert page.locator(row(before)).count() == 1, "the list was re-read, not duplicated"


def test_pages_past_a_hundred_search_reprioritise_and_stop_all(page: Any, server: Server, tmp_path: Path) -> None:
    gate = str(tmp_path / "never")
    answer = requests.post(server.base + "/echo", json=[{"text": str(n), "gate": gate} for n in range(105)],
                           timeout=30)
    assert answer.status_code == 202, answer.text
    uuids = [task["uuid"] for task in answer.json()["tasks"]]
    page.goto(server.base + "/mpc/")
    page.wait_for_selector(row(uuids[-1]))
    assert page.locator("#task-rows tr").count() == 100, "newest first, 100 at a time"
    assert page.locator(row(uuids[0])).count() == 0
    page.click("#older")
    page.wait_for_selector(row(uuids[0]))
    assert page.locator("#task-rows tr").count() == 105
    assert page.locator("#older").is_hidden()
    page.fill("#search", uuids[7][:6])
    assert page.locator(row(uuids[7])).is_visible()
    assert page.locator("#task-rows tr:visible").count() == sum(u.startswith(uuids[7][:6]) for u in uuids)
    page.fill("#search", uuids[7])
    page.wait_for_selector("#task-view:visible")
    assert page.inner_text("#task-uuid") == uuids[7]
    page.wait_for_selector("#task-status.status-queued")
    page.fill("#task-actions input.priority", "-5")
    page.click("#task-actions button.reprioritise")
    page.wait_for_selector("#task-fields div:has(dt:text-is('Priority')) dd:text-is('-5')")
    assert page.inner_text("#task-fields div:has(dt:text-is('Position')) dd") == "1", "first in the queue now"
    page.click("text=← all tasks")
    page.fill("#search", "")
    page.click('#controllers [data-controller="echo"] button.danger')  # confirmed by the page fixture
    page.wait_for_selector(f'{row(uuids[-1])}[data-status="stopped"]')
    page.wait_for_function("() => !document.querySelector('#task-rows tr:not([data-status=\"stopped\"])')")


def test_the_traceback_is_shown_when_the_controller_exposes_it(page: Any, pool: ServerPool, tmp_path: Path) -> None:
    server = start(pool, tmp_path, free_port(), ECHO_TRACEBACKS="1")
    failed = submit(server, "/echo", text="boom", fail=True)
    page.goto(server.base + f"/mpc/#/tasks/{failed}")
    page.wait_for_selector("#task-status.status-failed")
    assert page.inner_text("#task-error") == "ValueError: boom"
    assert "Traceback (most recent call last)" in page.inner_text("#task-traceback")
    assert "raise ValueError(text)" in page.inner_text("#task-traceback")
    assert page.locator("#task-traceback-note").is_hidden()


def test_the_task_page_shows_why_a_task_waits_and_what_a_running_one_uses(page: Any, server: Server) -> None:
    quick = submit(server, "/primes", limit=100, chunks=1)
    assert requests.get(f"{server.base}/primes/{quick}?wait=20", timeout=30).json()["status"] == "succeeded"
    running = [submit(server, "/primes", limit=100_000, chunks=400, pause=0.2) for _ in range(2)]  # both places
    queued = submit(server, "/primes", limit=100, chunks=1)
    page.goto(server.base + f"/mpc/#/tasks/{queued}")
    page.wait_for_selector("#task-status.status-queued")
    waiting = "#task-fields div:has(dt:text-is('Waiting on')) dd"
    page.wait_for_selector(f"{waiting}:text-matches('^slot: ')")
    eta = page.locator("#task-fields div:has(dt:text-is('ETA')) dd time")
    assert eta.get_attribute("datetime").endswith("+00:00"), "an estimate, from the median of the quick success"
    page.goto(server.base + f"/mpc/#/tasks/{running[0]}")
    page.wait_for_selector("#task-status.status-running")
    memory = "#task-fields div:has(dt:text-is('Memory peak')) dd"
    page.wait_for_selector(f"{memory} .memory-peak:text-matches('MiB$')")  # live, not "—"
    assert page.inner_text(f"{memory} .memory-limit") == " of 512.0 MiB limit"
    assert 0 < page.locator(f"{memory} meter").evaluate("m => m.value") < 512 * 1024 * 1024
    cpu = "#task-fields div:has(dt:text-is('CPU time')) dd"
    page.wait_for_selector(f"{cpu}:has-text('s (so far)')")
    assert re.fullmatch(r"[0-9]+\.[0-9]{2} s \(so far\)", page.inner_text(cpu)), page.inner_text(cpu)
    assert page.inner_text("#task-status") == "running"


def test_the_task_page_shows_the_limit_a_held_task_waits_on(page: Any, server: Server, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    running = submit(server, "/keyed", text="acct-7", gate=str(gate))
    poll_until(lambda: requests.get(f"{server.base}/keyed/{running}", timeout=10).json()["status"],
               lambda status: status == "running", 20)
    held = submit(server, "/keyed", text="acct-7")  # a place is free, but not for its key
    page.goto(server.base + f"/mpc/#/tasks/{held}")
    page.wait_for_selector("#task-status.status-queued")
    waiting = "#task-fields div:has(dt:text-is('Waiting on')) dd"
    page.wait_for_selector(f"{waiting}:text-matches('^key: ')")
    assert page.inner_text(waiting) == "key: a running task of its concurrency key to end (max_per_key) (acct-7)"
    gate.touch()
    page.wait_for_selector("#task-status.status-succeeded")  # it starts once the other ended


def test_a_stream_that_ends_normally_reconnects_without_showing_disconnected(page: Any, pool: ServerPool,
                                                                             tmp_path: Path) -> None:
    server = start(pool, tmp_path, free_port(), STREAM_SECONDS="1")
    page.goto(server.base + "/mpc/")
    page.wait_for_selector("#connection.up")
    # Every class the badge takes from now on (set again on each open of the stream).
    page.evaluate("""() => {
        window.badges = [];
        new MutationObserver(() => window.badges.push(document.getElementById('connection').className))
            .observe(document.getElementById('connection'), {attributes: true});
    }""")
    page.wait_for_function("() => window.badges.length >= 2")  # two more streams opened after ending
    assert set(page.evaluate("window.badges")) == {"connection up"}
    assert server.log().count("GET /mpc/events") >= 3


def test_retry_history_and_schedules(page: Any, server: Server) -> None:
    uuid = submit(server, "/flaky", why="<b>network down</b>")
    page.goto(server.base + f"/mpc/#/tasks/{uuid}")
    page.wait_for_selector("#task-status.status-failed")
    task = requests.get(f"{server.base}/mpc/api/tasks/{uuid}", timeout=10).json()
    assert len(task["errors"]) == 2, task
    assert page.locator("#task-retries li").count() == 2
    assert page.locator("#task-retries li").all_inner_texts() == \
        [f"attempt {e['attempt']}: ConnectionError: <b>network down</b>" if "attempt" in e
         else "ConnectionError: <b>network down</b>" for e in task["errors"]]
    assert page.inner_text("#task-fields div:has(dt:text-is('Attempt')) dd") == str(task["attempt"])
    page.click("text=← all tasks")
    page.wait_for_selector("#schedule-rows tr")
    assert page.locator("#schedule-rows tr").first.locator("td").all_inner_texts()[:4] == \
        ["nightly", "flaky", "every 86400 s", "active"]


def test_the_task_page_says_when_an_attempt_resumed_from_saved_state(page: Any, server: Server) -> None:
    uuid = submit(server, "/resumes", reached=7)
    page.goto(server.base + f"/mpc/#/tasks/{uuid}")
    page.wait_for_selector("#task-status.status-succeeded")
    task = requests.get(f"{server.base}/mpc/api/tasks/{uuid}", timeout=10).json()
    assert task["attempt"] == 2 and task["result"] == {"resumed_from": {"reached": 7}}, task
    assert task["state_saved_at"] is not None and "state" not in task
    resumed = page.locator("#task-fields div:has(dt:text-is('Resumed')) dd")
    assert resumed.inner_text().startswith("resumed from state saved at ")
    assert resumed.locator("time").get_attribute("datetime") == task["state_saved_at"]
    saved = page.locator("#task-fields div:has(dt:text-is('State saved')) dd time")
    assert saved.get_attribute("datetime") == task["state_saved_at"]


def test_a_drained_host_is_shown_until_it_is_undrained(page: Any, pool: ServerPool, tmp_path: Path) -> None:
    server = start(pool, tmp_path, free_port(), MPC_HOST_ID="rack-1/node-7")
    first = submit(server, "/echo", text="before")  # the controller starts: its host heartbeats
    drain = server.base + "/mpc/api/hosts/rack-1/node-7/drain"
    answer = requests.post(drain, timeout=10)
    assert answer.status_code == 200, answer.text
    page.goto(server.base + "/mpc/")
    line = '#drained-hosts .drained[data-host="rack-1/node-7"]'
    page.wait_for_selector(line)
    assert "host rack-1/node-7 drained since" in page.inner_text(line)
    assert page.locator(f"{line} time").get_attribute("datetime") == answer.json()["since"]
    assert requests.delete(drain, timeout=10).status_code == 200
    submit(server, "/echo", text="after")  # its events make the page read the health again
    page.wait_for_selector("#drained-hosts", state="hidden")
    assert requests.get(f"{server.base}/echo/{first}?wait=20", timeout=30).json()["status"] == "succeeded"


def cell(uuid: str, label: str) -> str:
    return f'{row(uuid)} td[data-label="{label}"]'


@pytest.mark.parametrize("page", [{"timezone_id": "Asia/Kolkata"}], indirect=True)
def test_the_list_shows_where_each_task_stands_and_absolute_times_in_the_browsers_zone(
        page: Any, pool: ServerPool, tmp_path: Path) -> None:
    server = start(pool, tmp_path, free_port(), MPC_HOST_ID="rack-9/node-3")
    gate = tmp_path / "gate"
    running = [submit(server, "/echo", text=f"run {n}", gate=str(gate)) for n in range(2)]  # both echo slots
    queued = submit(server, "/echo?priority=7", text="waits", gate=str(gate))
    stopped, going = (submit(server, "/primes", limit=100_000, chunks=100, pause=0.2) for _ in range(2))
    page.goto(server.base + "/mpc/")
    page.wait_for_selector(f"{cell(stopped, 'Progress')} .percent")  # the percent is text, not only a tooltip
    assert requests.delete(f"{server.base}/mpc/api/tasks/{stopped}", timeout=10).status_code in (200, 202)
    page.wait_for_selector(f'{row(stopped)}[data-status="stopped"]')
    page.wait_for_selector(f"{cell(going, 'Progress')} .percent")
    for uuid in (stopped, going):
        # Both read in one step: the running task's next event may redraw its row between two reads.
        shown, value = page.locator(row(uuid)).evaluate(
            "tr => [tr.querySelector('td[data-label=\"Progress\"] .percent').innerText,"
            " tr.querySelector('progress').value]")
        assert re.fullmatch(r"\d+ %", shown) and int(shown.split()[0]) == int(value), (shown, value)
    colour = "bar => getComputedStyle(bar).getPropertyValue('--bar')"
    assert page.locator(f"{row(stopped)} progress").evaluate(colour) != \
        page.locator(f"{row(going)} progress").evaluate(colour), "a stopped bar looks unlike a running one"

    page.wait_for_selector(f"{cell(queued, 'Where')} span:text-is('#1 in queue')")
    assert page.inner_text(cell(queued, "Priority")) == "7"
    assert page.inner_text(cell(queued, "Waited / ran")).startswith("queued for ")
    for uuid in running:
        page.wait_for_selector(f'{row(uuid)}[data-status="running"]')
        assert page.inner_text(cell(uuid, "Where")) == "rack-9/node-3"
        assert page.inner_text(cell(uuid, "Waited / ran")).startswith("running for ")
    task = requests.get(f"{server.base}/mpc/api/tasks/{running[0]}", timeout=10).json()
    assert task["host"] == "rack-9/node-3" and "owner" not in task
    first = submit(server, "/echo?priority=-1", text="jumps the queue", gate=str(gate))
    page.wait_for_selector(f"{cell(first, 'Where')} span:text-is('#1 in queue')")
    page.wait_for_selector(f"{cell(queued, 'Where')} span:text-is('#2 in queue')")  # the places shown follow the queue

    # Absolute times in the browser's zone (named with its offset), UTC in the tooltip.
    assert "UTC+05:30" in page.inner_text("#time-zone")
    created = datetime.fromisoformat(task["created_at"])
    local = created.astimezone(timezone(timedelta(hours=5, minutes=30)))
    shown_time = page.locator(f"{cell(running[0], 'Created')} time")
    assert shown_time.inner_text().split()[-1] == local.strftime("%H:%M:%S")
    assert shown_time.get_attribute("datetime") == task["created_at"]
    title = shown_time.get_attribute("title")
    assert local.strftime("%Y-%m-%d %H:%M:%S UTC+05:30") in title
    assert created.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") in title
    gate.touch()
    assert requests.delete(f"{server.base}/mpc/api/tasks/{going}", timeout=10).status_code in (200, 202)


def test_the_empty_list_says_how_to_submit_and_the_filters_live_in_the_url(page: Any, server: Server) -> None:
    page.goto(server.base + "/mpc/")
    page.wait_for_selector("#submit-hint pre.curl")
    assert page.locator("#list-empty").is_hidden()
    page.wait_for_selector("#chart .chart-empty")
    assert page.locator("#chart svg").count() == 0
    assert page.locator("#chart").bounding_box()["height"] < 40, "an empty chart takes one line"
    command = page.inner_text("#submit-hint pre.curl")
    found = re.fullmatch(r"curl -X POST '([^']+)' -H 'Content-Type: application/json' -d '(.*)'", command)
    assert found and found.group(1).startswith(server.base + "/"), command
    answer = requests.post(found.group(1), data=found.group(2), headers={"Content-Type": "application/json"},
                           timeout=10)
    assert answer.status_code == 202, answer.text  # the command shown works as it is
    uuid = answer.json()["uuid"]
    page.wait_for_selector(f'{row(uuid)}[data-status="succeeded"]')
    assert page.locator("#submit-hint").is_hidden()
    page.wait_for_selector("#chart svg")
    assert page.locator("#chart svg").bounding_box()["height"] < 80, "one task a minute takes a strip, not 200 px"

    for text, says in (("xyz", "hex digits (0-9, a-f)"), ("ab", "at least 4 hex digits")):
        page.fill("#search", text)
        page.wait_for_selector(f"#search-hint:has-text('{says}')")
    page.fill("#search", uuid[:6])
    assert page.locator("#search-hint").is_hidden()
    page.select_option("#filter-status", "succeeded")
    page.wait_for_selector('#filter-controller option[value="echo"]', state="attached")
    page.select_option("#filter-controller", "echo")
    page.wait_for_function("() => location.search.includes('controller=echo')")
    assert "status=succeeded" in page.url and f"q={uuid[:6]}" in page.url
    page.reload()  # a reload (or the link shared) keeps the filters and the search
    page.wait_for_selector(row(uuid))
    assert page.eval_on_selector("#filter-status", "s => s.value") == "succeeded"
    page.wait_for_function("() => document.getElementById('filter-controller').value === 'echo'")
    assert page.input_value("#search") == uuid[:6]
    page.goto(server.base + "/mpc/?status=failed&controller=echo")
    page.wait_for_selector("#list-empty:has-text('No tasks match these filters.')")
    assert page.locator(row(uuid)).count() == 0 and page.locator("#submit-hint").is_hidden()


def test_run_again_on_the_task_page_of_an_ended_task(page: Any, server: Server) -> None:
    failed = submit(server, "/echo", text="once more", fail=True)
    page.goto(server.base + f"/mpc/#/tasks/{failed}")
    page.wait_for_selector("#task-status.status-failed")
    page.click("#task-actions button.rerun")
    page.wait_for_function(f"() => /^#\\/tasks\\/[0-9a-f-]{{36}}$/.test(location.hash) && !location.hash.endsWith('{failed}')")
    again = page.evaluate("location.hash").rsplit("/", 1)[1]
    page.wait_for_function(f"() => document.getElementById('task-uuid').textContent === '{again}'")
    page.wait_for_selector("#task-status.status-failed")  # the same arguments: it fails the same way
    task = requests.get(f"{server.base}/mpc/api/tasks/{again}", timeout=10).json()
    assert (task["rerun_of"], task["args"], task["controller"]) == (failed, {"text": "once more", "fail": True}, "echo")
    page.click("#task-fields div:has(dt:text-is('Rerun of')) dd a")  # back to the first task: it names its rerun
    page.wait_for_selector(f"#task-fields div:has(dt:text-is('Reruns')) dd a[title='{again}']")
    assert page.inner_text("#task-uuid") == failed
    assert page.locator("#task-actions button.rerun").count() == 1


def test_a_share_link_page_shows_live_progress_and_task_text_as_text(page: Any, server: Server,
                                                                       tmp_path: Path) -> None:
    answer = requests.post(server.base + "/primes?share=600", json={"limit": 100_000, "chunks": 25, "pause": 0.12},
                           timeout=10)
    assert answer.status_code == 202, answer.text
    page.goto(answer.json()["share_url"])  # no login: the token opens this one task
    bar = "mpc-progress progress"
    first = page.wait_for_function(
        f"() => {{ const bar = document.querySelector('{bar}');"
        f" return bar && bar.value > 0 && bar.value < 100 ? bar.value : false; }}").json_value()
    page.wait_for_function(f"() => document.querySelector('{bar}').value > {first}")
    page.wait_for_selector('mpc-progress[data-status="succeeded"]')
    assert '"primes": 9592' in page.inner_text("mpc-progress .mpc-progress-result")

    hostile = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'
    echoed = requests.post(server.base + "/echo?share=600", json={"text": hostile, "gate": str(tmp_path / "gate")},
                           timeout=10).json()
    page.goto(echoed["share_url"])
    page.wait_for_selector('mpc-progress[data-status="running"]')
    # The task's first progress value follows its start (it is written with the next flush of progress).
    page.wait_for_function("() => document.querySelector('mpc-progress .mpc-progress-message').textContent !== ''")
    assert page.inner_text("mpc-progress .mpc-progress-message") == hostile
    (tmp_path / "gate").touch()
    page.wait_for_selector('mpc-progress[data-status="succeeded"]')
    assert page.inner_text("mpc-progress .mpc-progress-result") == hostile
    assert page.evaluate("() => window.pwned === undefined && document.querySelectorAll('main img').length === 0")
