"""``flask mpc``: list, inspect, stop, wait for, purge, submit and rerun tasks from a shell; list, drain and
undrain hosts; run a worker.

Flask finds the group through the ``flask.commands`` entry point before it imports the app,
and the group makes the process a client first (see :mod:`.registry`): importing the app then
creates its controllers as clients, which read and write the store but start no fork server and
no thread, so the command never runs a task. The one exception is ``worker``, which makes the
process a server again before the app is imported: running tasks is its job (see :mod:`.worker`).
``init_app`` also adds the same commands to ``app.cli`` (what ``app.test_cli_runner()`` invokes),
where the process's role is left as it is.

User errors (an unknown uuid, a bad argument) print one line and exit with a code that says which kind of
error it was (:data:`EXIT_CODES`, documented in docs/cli.md): a script can tell a task that failed from a
wait that timed out, a task that does not exist or a store that is down.

A task is named by its uuid or by a prefix of 8 or more hex digits that begins the uuid of one task only
(the short id the dashboard and ``list`` show; see :func:`~..http.handlers.resolve_task`).

Task text (messages, errors, tracebacks, log lines, names) is the tasks' and their submitters', not
the operator's: before it reaches the terminal, control characters (escape sequences, carriage
returns, bells, C1 codes) are shown escaped (``\x1b``), so that no task can move the cursor, rewrite
what was printed or talk to the terminal. Newlines and tabs are kept where they are content
(tracebacks, log lines, messages).
"""
from __future__ import annotations

import json
import time
import unicodedata
import uuid as uuid_module
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, Optional

import click
from flask.cli import AppGroup, with_appcontext

from ..artifacts import ArtifactStorage, sweep
from .. import registry
from ..exceptions import (
    BatchNotFound, HostNotFound, IdempotencyKeyReused, InvalidRequest, MPCError, PayloadTooLarge, StoreError,
    StoreUnavailable, TaskNotFound,
)
from .. import defaults
from ..states import TERMINAL, TaskStatus

if TYPE_CHECKING:
    from ..controller import MetaMPController

#: Seconds between two looks at a task's progress while ``wait`` draws its bar.
_WAIT_STEP = 0.5

#: Exit codes of the commands.
EXIT_OK = 0
#: ``wait``: the task ended without succeeding (failed, stopped, timed out or lost).
EXIT_TASK_FAILED = 1
#: A bad command line or argument, an unknown controller, a uuid prefix that names several tasks
#: (click's own usage errors exit 2 as well).
EXIT_USAGE = 2
#: No such task (or host).
EXIT_NOT_FOUND = 3
#: ``wait --timeout``: the time passed before the task ended (it may still be running).
EXIT_TIMEOUT = 4
#: The task store could not be reached.
EXIT_STORE_UNAVAILABLE = 5
#: The action does not apply to the task as it is (it already ended, it is not running or not paused),
#: the ``can_change`` hook refused it, or the queue is full.
EXIT_REFUSED = 6

#: Each exit code and what it means (docs/cli.md lists them).
EXIT_CODES = {EXIT_OK: "ok", EXIT_TASK_FAILED: "the task did not succeed", EXIT_USAGE: "usage error",
              EXIT_NOT_FOUND: "not found", EXIT_TIMEOUT: "timed out waiting",
              EXIT_STORE_UNAVAILABLE: "store unavailable", EXIT_REFUSED: "refused"}


class CommandError(click.ClickException):
    """A user error: one line on standard error, and ``exit_code``."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def exit_code_of(exc: MPCError) -> int:
    """The exit code of a command that ``exc`` ended."""
    if isinstance(exc, (TaskNotFound, BatchNotFound, HostNotFound)):
        return EXIT_NOT_FOUND
    if isinstance(exc, StoreError):
        return EXIT_STORE_UNAVAILABLE
    if isinstance(exc, (InvalidRequest, PayloadTooLarge, IdempotencyKeyReused)):
        return EXIT_USAGE
    return EXIT_REFUSED


def _commands(group: AppGroup) -> AppGroup:
    """Add every ``mpc`` subcommand to ``group``."""
    for command in (list_command, status_command, stop_command, pause_command, resume_command,
                    reprioritise_command, wait_command, purge_command, submit_command, logs_command,
                    schedules_command, hosts_command, drain_command, undrain_command, worker_command, rerun_command):
        group.add_command(command)
    return group


def _controllers() -> list["MetaMPController"]:
    from ..extension import MultiprocessController

    return MultiprocessController.controllers()


def _controller(name: str) -> "MetaMPController":
    from ..extension import MultiprocessController

    try:
        return MultiprocessController.controller(name)
    except LookupError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None


def _task(reference: str) -> tuple["MetaMPController", str]:
    """The controller and uuid of the task ``reference`` names: a uuid, or a prefix of 8 or more hex digits
    of exactly one task's (the lookup the extension's API makes, see :func:`.handlers.resolve_task`)."""
    from ..exceptions import TaskPrefixNotFound
    from ..http.handlers import resolve_task

    try:
        return resolve_task(_controllers(), reference)
    except TaskNotFound as exc:
        message = exc.message if isinstance(exc, TaskPrefixNotFound) else \
            f"No task with uuid {exc.uuid} is known to any controller."
        raise CommandError(message, EXIT_NOT_FOUND) from None


def _user_errors(action: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the package's errors into one-line click errors."""
    import functools

    @functools.wraps(action)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return action(*args, **kwargs)
        except MPCError as exc:
            raise CommandError(exc.message, exit_code_of(exc)) from None

    return guarded


def escape_controls(text: Any, keep: str = "\n\t") -> str:
    """``text`` (made a string) with every control character but those in ``keep`` written as an escape
    (``\x1b``, ``\x9b``): what is printed to a terminal from tasks cannot drive it."""
    text = str(text)
    return "".join(char if char in keep or unicodedata.category(char) != "Cc" else
                   (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}") for char in text)


def _say(text: Any, keep: str = "\n\t") -> None:
    """Print task text, its control characters escaped (see :func:`escape_controls`)."""
    click.echo(escape_controls(text, keep))


def _ago(iso: Optional[str]) -> str:
    if not iso:
        return "-"
    seconds = max(0.0, time.time() - datetime.fromisoformat(iso).timestamp())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _table(tasks: list[dict[str, Any]]) -> str:
    header = ("UUID", "CONTROLLER", "STATUS", "%", "CREATED", "ENDED")
    rows = [tuple(escape_controls(cell, "") for cell in (
        t["uuid"], t["controller"], t["status"], "-" if t.get("percent") is None else f"{t['percent']:.0f}",
        _ago(t.get("created_at")), _ago(t.get("ended_at")))) for t in tasks]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip()
                     for line in (header, *rows))


@click.command("list")
@click.option("--status", "statuses", multiple=True, metavar="STATUS[,STATUS...]",
              help="Only tasks in these states (repeatable, or comma-separated): "
                   f"{', '.join(s.value for s in TaskStatus)}.")
@click.option("--controller", "controller_name", help="Only this controller's tasks.")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@with_appcontext
@_user_errors
def list_command(statuses: tuple[str, ...], controller_name: Optional[str], limit: int, as_json: bool) -> None:
    """List the newest tasks of every controller."""
    from ..http.handlers import statuses_option
    from ..http.views import list_all

    wanted = list(dict.fromkeys(s for raw in statuses for s in statuses_option(raw)))
    controllers = [_controller(controller_name)] if controller_name else _controllers()
    found = list_all(controllers, wanted, limit, None)["tasks"]
    click.echo(json.dumps(found, indent=2) if as_json else (_table(found) if found else "No tasks."))


@click.command("status")
@click.argument("uuid")
@click.option("--json", "as_json", is_flag=True, help="Print the task object as JSON.")
@with_appcontext
@_user_errors
def status_command(uuid: str, as_json: bool) -> None:
    """Show one task (UUID: its uuid, or the first 8 or more hex digits of it)."""
    controller, uuid = _task(uuid)
    task = controller.status(uuid)
    if as_json:
        click.echo(json.dumps(task, indent=2))
        return
    for key in ("uuid", "controller", "status", "msg", "progress", "percent", "args", "result", "created_at",
                "started_at", "ended_at", "pid", "attempt"):
        value = json.dumps(task.get(key)) if key in ('progress', 'args', 'result') else task.get(key)
        _say(f"{key:>10}: {value}", keep="")
    error = task.get("error")
    if error:
        _say(f"{'error':>10}: {escape_controls(error['type'], '')}: {error['message']}")
        if error.get("traceback"):
            _say(error["traceback"].rstrip())


@click.command("stop")
@click.argument("uuid", required=False)
@click.option("--all", "stop_all", is_flag=True, help="Stop every queued and running task of --controller.")
@click.option("--controller", "controller_name", help="With --all: the controller whose tasks to stop.")
@click.option("--finish", is_flag=True,
              help="Ask the running task to finish now and return its best answer so far (kept as its result).")
@with_appcontext
@_user_errors
def stop_command(uuid: Optional[str], stop_all: bool, controller_name: Optional[str], finish: bool) -> None:
    """Stop a task (a queued one never starts; a running one is stopped gracefully), or all of a controller's.

    With --finish, the running task is asked to finish now: it returns its best answer so far, kept as its
    result, and ends stopped.
    """
    if stop_all:
        if finish:
            raise CommandError("--finish asks one task (UUID) to finish now; it does not go with --all.", EXIT_USAGE)
        if uuid or not controller_name:
            raise CommandError("Use either UUID, or --all with --controller NAME.", EXIT_USAGE)
        counts = _controller(controller_name).stop_all()
        click.echo(f"Stopped {counts['stopped']} queued task(s); {counts['stopping']} running task(s) are stopping.")
        return
    if not uuid:
        raise CommandError("Name the task to stop (UUID), or use --all --controller NAME.", EXIT_USAGE)
    controller, uuid = _task(uuid)
    task = controller.stop(uuid, finish=finish)
    _say(task["msg"], keep="")


@click.command("pause")
@click.argument("uuid")
@with_appcontext
@_user_errors
def pause_command(uuid: str) -> None:
    """Pause a running task: its whole process tree is suspended (it keeps its slot) until resumed."""
    controller, uuid = _task(uuid)
    _say(controller.pause(uuid)["msg"], keep="")


@click.command("resume")
@click.argument("uuid")
@with_appcontext
@_user_errors
def resume_command(uuid: str) -> None:
    """Resume a paused task."""
    controller, uuid = _task(uuid)
    _say(controller.resume(uuid)["msg"], keep="")


@click.command("reprioritise", context_settings={"ignore_unknown_options": True})  # a priority may be -5
@click.argument("uuid")
@click.argument("priority", type=int)
@with_appcontext
@_user_errors
def reprioritise_command(uuid: str, priority: int) -> None:
    """Give a queued task another PRIORITY (an integer, lower runs first: -5 before 0)."""
    from ..http.patching import check_priority

    controller, uuid = _task(uuid)
    task = controller.reprioritise(uuid, check_priority(priority))
    position = f", place {task['position']} in the queue" if task.get("position") else ""
    _say(f"Task {uuid} has priority {task['priority']}{position}.", keep="")


@click.command("rerun")
@click.argument("uuid")
@with_appcontext
@_user_errors
def rerun_command(uuid: str) -> None:
    """Queue an ended task again (same controller, arguments, priority and timeout); print the new task's uuid.

    Any ended task may be run again: failed, stopped, timed_out, lost or succeeded. The new task's
    ``rerun_of`` names the first one."""
    controller, uuid = _task(uuid)
    click.echo(controller.rerun(uuid)["uuid"])


@click.command("logs")
@click.argument("uuid")
@click.option("--follow", is_flag=True, help="Print new lines as they come, until the task ends.")
@with_appcontext
@_user_errors
def logs_command(uuid: str, follow: bool) -> None:
    """Print a task's kept log lines (what it logged and printed)."""
    controller, uuid = _task(uuid)
    book = controller.store.logs
    after = 0
    while True:
        lines = book.read(uuid, after)
        for n, line in lines:
            _say(line)
            after = n
        if not follow or lines:
            if not follow:
                return
            continue
        if controller.status(uuid)["status"] in TERMINAL:
            for n, line in book.read(uuid, after):
                _say(line)
            return
        time.sleep(_WAIT_STEP)


@click.command("schedules")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@with_appcontext
@_user_errors
def schedules_command(as_json: bool) -> None:
    """List every controller's schedules, their next firing and whether a server still declares them."""
    found = [info for controller in _controllers() for info in controller.schedules()]
    if as_json:
        click.echo(json.dumps(found, indent=2, default=str))
        return
    if not found:
        click.echo("No schedules.")
        return
    for info in found:
        when = info.get("cron") or f"every {info.get('every'):g} s"
        state = "active" if info.get("active") else "inactive"
        _say(f"{info['controller']}/{info['name']}: {when} ({state}); next {info.get('next_firing') or '-'}", keep="")


@click.command("wait")
@click.argument("uuid")
@click.option("--timeout", type=click.FloatRange(min=0), help="Give up after this many seconds.")
@with_appcontext
@_user_errors
def wait_command(uuid: str, timeout: Optional[float]) -> None:
    """Wait for a task to end, with a progress bar; exit 0 if it succeeded, 1 if it ended otherwise, 4 if
    --timeout passed first (the task goes on)."""
    controller, uuid = _task(uuid)
    deadline = None if timeout is None else time.monotonic() + timeout
    with click.progressbar(length=100, label=f"Task {uuid[:8]}", show_eta=False) as bar:
        shown = 0
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            task = controller.wait(uuid, _WAIT_STEP if left is None else min(_WAIT_STEP, left))
            percent = int(task.get("percent") or 0)
            if task["status"] == TaskStatus.SUCCEEDED:
                percent = 100
            if percent > shown:
                bar.update(percent - shown)
                shown = percent
            if task["status"] in TERMINAL or (deadline is not None and time.monotonic() >= deadline):
                break
    _say(task["msg"], keep="")
    if task["status"] not in TERMINAL:
        click.echo(f"Gave up waiting after {timeout:g} s: task {uuid} is {task['status']}.", err=True)
        raise SystemExit(EXIT_TIMEOUT)
    raise SystemExit(EXIT_OK if task["status"] == TaskStatus.SUCCEEDED else EXIT_TASK_FAILED)


@click.command("purge")
@click.option("--older-than", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Delete finished tasks that ended more than this long ago (default: each controller's retention).")
@with_appcontext
@_user_errors
def purge_command(older_than: Optional[float]) -> None:
    """Delete finished tasks past their retention now."""
    total = 0
    for controller in _controllers():
        store = controller.store
        keep = controller.retention if older_than is None else older_than
        purged = store.purge(controller.name, store.now() - keep)
        if purged:
            sweep(ArtifactStorage(controller.artifacts_directory), store)  # a task's files go with it
        total += purged
    click.echo(f"Purged {total} task(s).")


class _NotJSONNumber(ValueError):
    """A submit argument holds NaN or Infinity: refused, not taken for a string."""


def _no_constant(name: str) -> Any:
    raise _NotJSONNumber(name)


@click.command("submit")
@click.argument("controller_name", metavar="CONTROLLER")
@click.argument("arguments", nargs=-1, metavar="KEY=VALUE...")
@click.option("--idempotency-key", "key", metavar="KEY",
              help="Submit at most once with this key (within the controller's idempotency_ttl): the same key "
                   "again prints the task it made. Default: a fresh key, used for the command's own retries.")
@with_appcontext
@_user_errors
def submit_command(controller_name: str, arguments: tuple[str, ...], key: Optional[str]) -> None:
    """Queue a task; each VALUE is JSON when it parses (42, true, [1, 2]), else a string.

    The task is queued with an idempotency key, so that when the store's answer is lost (the store
    became unreachable during the write) the command asks again with the same key and never queues
    the task twice."""
    kwargs: dict[str, Any] = {}
    for argument in arguments:
        key, sep, raw = argument.partition("=")
        if not sep or not key:
            raise CommandError(f"Arguments look like KEY=VALUE, not {argument!r}.", EXIT_USAGE)
        try:
            kwargs[key] = json.loads(raw, parse_constant=_no_constant)
        except _NotJSONNumber:
            raise CommandError(f"Argument {key!r}: {raw!r} holds NaN or Infinity, which are not JSON "
                               f"numbers; quote it to pass a string (KEY='\"{raw}\"').", EXIT_USAGE) from None
        except ValueError:
            kwargs[key] = raw
    controller = _controller(controller_name)
    click.echo(_submit_once(controller, key or str(uuid_module.uuid4()), kwargs))
    warning = unserved_warning(controller)
    if warning:
        click.echo(f"Warning: {warning}", err=True)


def unserved_warning(controller: "MetaMPController") -> Optional[str]:
    """Why nothing may run the controller's queued tasks now, or None when a live server may.

    A serving process heartbeats in the store (each second) while it serves; one whose last heartbeat is
    older than the controller's ``lease``, or whose host is drained, claims nothing. The heartbeats name
    processes, not controllers: a live server of another controller only (a ``worker --controller``)
    counts as one. Never raises: a store that cannot say gives no warning.
    """
    from ..store.base import owner_host

    try:
        store = controller.store
        now, beats, drained = store.now(), store.heartbeats(), store.drained_hosts()
    except (MPCError, NotImplementedError):
        return None
    live = {owner_host(owner) for owner, beat in beats.items() if now - beat <= controller.lease}
    live.discard(None)
    if not live:
        return (f"no live server heartbeats in the store of controller {controller.name}: the task is queued, "
                f"but nothing runs it until a server of the app is up and serving (flask run, gunicorn, "
                f"flask mpc worker).")
    if live <= set(drained):
        return (f"every host with a live server of the store is drained ({', '.join(sorted(map(str, live)))}): "
                f"the task is queued, but nothing runs it until one is undrained (flask mpc undrain).")
    return None


def _submit_once(controller: "MetaMPController", key: str, kwargs: dict[str, Any]) -> str:
    """Queue ``kwargs`` with idempotency ``key``; a store that did not answer is asked again with the key,
    a few times with a growing delay. Returns the task's uuid (the one the key made, if it was used)."""
    attempt = 0
    while True:
        try:
            submitted = controller.enqueue_once(key, [kwargs])
            break
        except StoreUnavailable:
            attempt += 1
            if attempt >= defaults.SUBMIT_ATTEMPTS:
                raise
            time.sleep(min(0.5 * 2 ** (attempt - 1), 5.0))
    if submitted.replayed:
        click.echo(f"Already submitted with this key: task {submitted.rows[0]['uuid']}.", err=True)
    return str(submitted.rows[0]["uuid"])


def _echo_drain(state: dict[str, Any]) -> None:
    state = {**state, "host": escape_controls(state["host"], "")}
    if state["drained"]:
        click.echo(f"Host {state['host']} is drained (since {state['since']}): its serving processes claim "
                   f"no new task; running ones go on.")
    else:
        click.echo(f"Host {state['host']} is not drained: its serving processes claim tasks.")


@click.command("hosts")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@with_appcontext
@_user_errors
def hosts_command(as_json: bool) -> None:
    """List the hosts whose serving processes heartbeat in the store, and which are drained."""
    from ..engine.drain import known_hosts

    found = known_hosts(_controllers())
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    if not found:
        click.echo("No hosts.")
        return
    header = ("HOST", "HEARTBEAT", "DRAINED")
    rows = [(escape_controls(h["host"], ""), _ago(h["heartbeat"]), f"since {h['since']}" if h["drained"] else "-")
            for h in found]
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    for line in (header, *rows):
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


_HOST_HELP = ("The host, as its servers name it (MPC_HOST_ID, else the host name and pid namespace); "
              "default: this host.")


@click.command("drain")
@click.option("--host", help=_HOST_HELP)
@with_appcontext
@_user_errors
def drain_command(host: Optional[str]) -> None:
    """Make every serving process of a host claim no new task, for every controller; running tasks go on."""
    from ..engine.drain import set_host_drained
    from ..engine.owners import host_id

    _echo_drain(dict(set_host_drained(_controllers(), host_id() if host is None else host, True)))


@click.command("undrain")
@click.option("--host", help=_HOST_HELP)
@with_appcontext
@_user_errors
def undrain_command(host: Optional[str]) -> None:
    """Let the serving processes of a drained host claim tasks again, at once."""
    from ..engine.drain import set_host_drained
    from ..engine.owners import host_id

    _echo_drain(dict(set_host_drained(_controllers(), host_id() if host is None else host, False)))


def _as_worker(command: Callable[..., Any]) -> Callable[..., Any]:
    """Make the process a server with the ``--slots`` asked for, before the app is imported (which
    ``with_appcontext``, inside, does): its controllers are created for that."""
    import functools

    @functools.wraps(command)
    def serving(*args: Any, **kwargs: Any) -> Any:
        registry.become_server()
        registry.set_slots(kwargs.get("slots"))
        return command(*args, **kwargs)

    return serving


@click.command("worker")
@click.option("--controller", "names", multiple=True, metavar="NAME",
              help="Serve only this controller (repeatable); default: every controller of the app.")
@click.option("--slots", type=click.IntRange(min=1),
              help="Controlling threads per controller in this process; default: its max_num_process, which "
                   "stays the limit across every process.")
@_as_worker
@with_appcontext
@_user_errors
def worker_command(names: tuple[str, ...], slots: Optional[int]) -> None:
    """Run the app's tasks in this process, which serves no HTTP, until SIGTERM or SIGINT."""
    from . import worker

    controllers = [_controller(name) for name in dict.fromkeys(names)] if names else _controllers()
    worker.start(controllers, slots)
    worker.wait_for_exit()


class _ClientGroup(AppGroup):
    """The ``mpc`` group as the ``flask`` command loads it: the process becomes a client before any
    subcommand imports the app."""

    def invoke(self, ctx: click.Context) -> Any:
        registry.become_client()
        return super().invoke(ctx)


_HELP = "Inspect and control flask-multiprocess-controller tasks."

#: The commands as ``init_app`` adds them to ``app.cli`` (the process's role is left as it is).
mpc_commands = _commands(AppGroup("mpc", help=_HELP))

#: The ``flask.commands`` entry point: the same commands, run as a client-only process.
mpc = _commands(_ClientGroup("mpc", help=_HELP))
