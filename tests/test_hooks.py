"""Hooks: delivery from the outbox (at least once, once per hook and event when
nothing crashes), isolation (timeouts, crashes), retries, registration, commands.

Real parts: the hook worker is a real subprocess; the crash test kills a real
dispatcher process with SIGKILL; both databases through the ``db`` fixture.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.test_facilities_cli import run, sim  # noqa: F401 - fixtures: tomd obs against the simulator
from tomd.db import repository as repo
from tomd.db.models import HookRun, Notification, OutboxEvent, Target
from tomd.events import TargetCreated
from tomd.hooks.registry import Registry, load_hooks
from tomd.hooks.runner import HookRunner, RunnerSettings

REPO = Path(__file__).resolve().parents[1]


def write(dir_: Path, name: str, text: str) -> Path:
    dir_.mkdir(parents=True, exist_ok=True)
    p = dir_ / name
    p.write_text(textwrap.dedent(text))
    return p


def make_runner(db, hooks_dir: Path, *, registry=None, **kw) -> HookRunner:
    # timeout: each hook's default limit, and how long a worker may take to start and load the files.
    # Far above what any of this takes on a loaded machine (a worker runs at nice 10, so it starts
    # slowest there): nothing here may depend on beating it, and a lease (timeout + lease_margin)
    # never ends under a run that is merely slow. The tests that time a hook out give it its own.
    settings = dict(paths=(str(hooks_dir),), retry_backoff=0.05, retry_max=0.2, poll=0.1, timeout=120.0,
                    lease_margin=30.0)
    settings.update(kw)
    return HookRunner(db.sessions, RunnerSettings(**settings), database_url=db.url, registry=registry)


def new_targets(db, n: int, prefix: str = "T") -> list[int]:
    """n targets and their target.created events, one transaction."""
    ids = []
    with db.sessions.begin() as s:
        for i in range(n):
            t = Target(name=f"{prefix}{i}", ra=10.0 + i, dec=-5.0)
            s.add(t)
            s.flush()
            ids.append(t.id)
        repo.add_events(s, [(TargetCreated(t, f"{prefix}{i}", 10.0 + i, -5.0, "test"), t) for i, t in enumerate(ids)])
    return ids


def event_ids(db, kind: str) -> list[int]:
    with db.sessions() as s:
        return list(s.scalars(select(OutboxEvent.id).where(OutboxEvent.kind == kind).order_by(OutboxEvent.id)))


def runs(db, hook: str | None = None) -> list[HookRun]:
    with db.sessions() as s:
        q = select(HookRun).order_by(HookRun.id)
        if hook:
            q = q.where(HookRun.hook == hook)
        return list(s.scalars(q))


def drain(runner: HookRunner, db, *, deadline_s: float = 180.0) -> None:
    """run_once until no event is new and no run is pending or running (retries wait their backoff);
    a generous deadline that ends as soon as that holds (worker restarts are slow on a loaded machine)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        result = runner.run_once()
        if not result.expanded and not any(r.state in ("pending", "running") for r in runs(db)):
            return
        time.sleep(0.05)
    raise AssertionError("hook runs still pending: " + ", ".join(f"{r.hook}#{r.event_id}:{r.state}"
                                                                 for r in runs(db) if r.state != "done"))


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


RECORDER = """
    import asyncio
    from tomd.hooks import on

    @on("target.created")
    def first(ctx):
        with open(ctx.settings["out"], "a") as f:
            f.write(f"first {ctx.event_id} {ctx.target.name}\\n")
        ctx.tag("seen")
        ctx.add_to_list("new-targets")
        ctx.notify("log", f"new target {ctx.event.name}", key="a")

    @on("target.created", "target.updated")
    async def second(ctx):
        await asyncio.sleep(0)
        with open(ctx.settings["out"], "a") as f:
            f.write(f"second {ctx.event_id} {ctx.event.kind}\\n")

    @on("target.created", since="all")
    def everything(ctx):
        with open(ctx.settings["out"], "a") as f:
            f.write(f"everything {ctx.event_id}\\n")
"""


def test_each_hook_gets_each_event_once_and_its_actions_apply(db, tmp_path):
    out = tmp_path / "out.txt"
    write(tmp_path / "hooks", "rec.py", RECORDER)
    (old,) = new_targets(db, 1, "OLD")  # written before any daemon saw the hooks
    runner = make_runner(db, tmp_path / "hooks", settings={"rec": {"out": str(out)}})
    try:
        runner.start()
        ids = new_targets(db, 3)
        drain(runner, db)
        created = event_ids(db, "target.created")
        updated = event_ids(db, "target.updated")  # the tag and list actions announce the change
        got = Counter(lines(out))
        assert all(n == 1 for n in got.values()), got
        new_events = created[1:]
        assert {ln for ln in got if ln.startswith("first")} == {
            f"first {e} T{i}" for i, e in enumerate(new_events)}
        assert {ln for ln in got if ln.startswith("second")} == (
            {f"second {e} target.created" for e in new_events} | {f"second {e} target.updated" for e in updated})
        # since="all" also takes the event written before the hook was registered
        assert {ln for ln in got if ln.startswith("everything")} == {f"everything {e}" for e in created}
        assert len(updated) == 6  # tag + list, per new target
        with db.sessions() as s:
            assert repo.tags_of(s, ids + [old]) == {**{i: ["seen"] for i in ids}, old: []}
            assert repo.lists_of(s, ids) == {i: ["new-targets"] for i in ids}
            notes = list(s.scalars(select(Notification).order_by(Notification.id)))
        assert [(n.channel, n.event_id, n.target_id) for n in notes] == [
            ("log", e, t) for e, t in zip(new_events, ids)]
        assert notes[0].dedupe_key == f"hook:rec.first:{new_events[0]}:a"
        # nothing runs twice: another pass and a fresh runner (a restart) add nothing
        runner.run_once()
        runner2 = make_runner(db, tmp_path / "hooks", settings={"rec": {"out": str(out)}})
        try:
            drain(runner2, db)
        finally:
            runner2.close()
        assert Counter(lines(out)) == got
        assert all(r.state == "done" for r in runs(db))
    finally:
        runner.close()


FAILING = """
    import os
    from tomd.hooks import on

    @on("target.created", max_attempts=3)
    def raises(ctx):
        raise RuntimeError(f"broken on {ctx.event_id}, attempt {ctx.attempt}")

    @on("target.created", max_attempts=2)
    def exits(ctx):
        os._exit(3)

    @on("target.created")
    def fine(ctx):
        with open(ctx.settings["out"], "a") as f:
            f.write(f"fine {ctx.event_id}\\n")
"""


def test_failing_hooks_are_retried_with_backoff_then_recorded_failed(db, tmp_path):
    out = tmp_path / "out.txt"
    write(tmp_path / "hooks", "bad.py", FAILING)
    # an hour's backoff: however slow the machine, no retry comes due inside a pass; the test moves
    # each due time into the past itself (the clock passing), so it never depends on timing
    runner = make_runner(db, tmp_path / "hooks", settings={"bad": {"out": str(out)}}, retry_backoff=3600.0,
                         retry_max=3600.0)
    try:
        runner.start()
        new_targets(db, 2)
        first = runner.run_once()
        assert first.done == 2 and first.retried == 4 and first.failed == 0
        pending = [r for r in runs(db) if r.state == "pending"]
        assert len(pending) == 4
        for r in pending:  # waiting for a later attempt, with the reason kept
            assert r.attempts == 1 and r.next_attempt_at is not None and r.error
        assert runner.run_once().retried + runner.run_once().failed == 0  # nothing is due before its backoff
        for _ in range(10):  # the backoff passes: each pending run comes due, until all have ended
            with db.sessions.begin() as s:
                waiting = s.scalars(select(HookRun).where(HookRun.state == "pending")).all()
                if not waiting:
                    break
                for r in waiting:
                    assert r.next_attempt_at > datetime.now(timezone.utc) + timedelta(minutes=30)
                    r.next_attempt_at = datetime.now(timezone.utc) - timedelta(seconds=1)
            runner.run_once()
        drain(runner, db)
        events = event_ids(db, "target.created")
        for r in runs(db, "bad.raises"):
            if r.event_id in events:
                assert (r.state, r.attempts) == ("failed", 3)
                assert "Traceback" in r.error and f"RuntimeError: broken on {r.event_id}, attempt 3" in r.error
        for r in runs(db, "bad.exits"):
            if r.event_id in events:
                assert (r.state, r.attempts) == ("failed", 2)
                assert "exit code 3" in r.error
        assert sorted(lines(out)) == sorted(f"fine {e}" for e in events)  # the others ran, once
        with db.sessions() as s:
            failed = [o.payload for o in s.scalars(select(OutboxEvent).where(OutboxEvent.kind == "hook.failed"))]
        assert sorted((p["hook"], p["event_id"], p["attempts"]) for p in failed) == sorted(
            [("bad.raises", e, 3) for e in events] + [("bad.exits", e, 2) for e in events])
    finally:
        runner.close()


HANGING = """
    import os, time
    from tomd.hooks import on

    @on("target.created", timeout="1s", max_attempts=1)
    def a_hangs(ctx):
        started = time.monotonic()  # one clock for every process on Linux, as the runner's deadlines
        with open(ctx.settings["out"], "a") as f:
            f.write(f"hang {ctx.event_id} {os.getpid()} {started}\\n")
        time.sleep(120)

    @on("target.created")
    def b_after(ctx):
        import os
        with open(ctx.settings["out"], "a") as f:
            f.write(f"after {ctx.event_id} {os.getpid()}\\n")
"""


def test_a_hanging_hook_is_killed_after_its_timeout_and_the_next_hooks_run(db, tmp_path):
    out = tmp_path / "out.txt"
    write(tmp_path / "hooks", "slow.py", HANGING)
    runner = make_runner(db, tmp_path / "hooks", settings={"slow": {"out": str(out)}})
    try:
        runner.start()
        (tid,) = new_targets(db, 1)
        (event,) = event_ids(db, "target.created")
        died: list[float] = []
        deadline: list[tuple[int, float]] = []  # (run id, deadline) of the first run the worker went into

        def watch() -> None:  # the run's deadline, as the runner holds it, and when the hung worker is gone
            while not died:
                shared = runner._slots[0].worker.slot
                if not deadline and shared is not None:
                    try:
                        run_id, until = shared.get()
                    except ValueError:  # closed: a restart replaced it
                        run_id, until = 0, 0.0
                    if run_id:
                        deadline.append((run_id, until))
                got = lines(out)
                if got and not _alive(int(got[0].split()[2])):
                    died.append(time.monotonic())
                time.sleep(0.01)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        result = runner.run_once()
        watcher.join(60)
        assert (result.done, result.failed) == (1, 1)
        (hang,) = [r for r in runs(db, "slow.a_hangs") if r.event_id == event]
        assert hang.state == "failed" and "ran longer than 1 s and was killed" in hang.error
        got = lines(out)
        assert got[0].startswith(f"hang {event} ") and got[1].startswith(f"after {event} ")
        # Its 1 s counts from the run's start, just before the hook's first line (by how long the
        # machine takes to get there, the hook's own start may come later): killed at that deadline,
        # never before it, and soon after (a generous bound on behaviour, not a benchmark).
        (run_id, until), started = deadline[0], float(got[0].split()[3])
        assert run_id == hang.id
        assert until - 1.0 <= started < until <= died[0] < until + 10.0, (until, started, died[0])
        # the worker that hung is gone: the next hook ran in a fresh one
        hung_pid = runner._slots[0].worker.proc.pid
        assert int(got[1].split()[2]) == hung_pid
        assert runner._slots[0].worker.starts == 2
    finally:
        runner.close()


LEAVES_A_CHILD = """
    import subprocess, time
    from tomd.hooks import on

    @on("target.created", timeout="1s", max_attempts=1)
    def spawns(ctx):
        child = subprocess.Popen(["sleep", "300"])
        with open(ctx.settings["out"], "a") as f:
            f.write(f"{child.pid}\\n")
        time.sleep(120)
"""


def test_a_killed_hook_leaves_no_child_process_behind(db, tmp_path):
    out = tmp_path / "out.txt"
    write(tmp_path / "hooks", "spawn.py", LEAVES_A_CHILD)
    runner = make_runner(db, tmp_path / "hooks", settings={"spawn": {"out": str(out)}})
    child = None
    try:
        runner.start()
        new_targets(db, 1)
        assert runner.run_once().failed == 1
        (child,) = [int(x) for x in lines(out)]
        _wait(lambda: not _alive(child), timeout=60)  # killed with the worker's process group
    finally:
        runner.close()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)


LOGGING = """
    import logging
    from tomd.hooks import on

    @on("target.created")
    def talks(ctx):
        ctx.log.info("ctx line")
        logging.getLogger(__name__).info("module line")
        noisy = logging.getLogger("alembic.runtime.migration")
        noisy.setLevel(logging.INFO)  # as a library's own logging setup does
        noisy.info("Context impl SQLiteImpl.")
        logging.getLogger("httpx").info("HTTP Request: GET http://x")
        logging.getLogger("urllib3").warning("a library warning")
"""


def test_hook_output_is_forwarded_and_library_info_lines_are_not(db, tmp_path, caplog):
    write(tmp_path / "hooks", "talk.py", LOGGING)
    runner = make_runner(db, tmp_path / "hooks")
    caplog.set_level(logging.DEBUG)
    try:
        runner.start()
        new_targets(db, 1)
        assert runner.run_once().done == 1
    finally:
        runner.close()
    got = {(r.levelno, r.getMessage()) for r in caplog.records}
    event = event_ids(db, "target.created")[0]
    assert (logging.INFO, f"hook talk.talks event #{event}: ctx line") in got
    assert (logging.INFO, "module line") in got
    assert (logging.WARNING, "a library warning") in got
    messages = " ".join(m for _, m in got)
    assert "SQLiteImpl" not in messages and "HTTP Request" not in messages


def test_builtin_subscribers_run_inside_the_transaction_that_marks_them_done(db, tmp_path):
    calls = []

    def flaky(s, event):
        calls.append(event.target_id)
        repo.add_tags(s, event.target_id, ["builtin"])
        if len(calls) == 1:
            raise RuntimeError("first time fails")  # its tag must be rolled back with it

    registry = Registry()
    registry.add_builtin("builtin:tagger", ["target.created"], flaky)
    # An hour's backoff: however long the pass takes, the retry cannot come due inside it (with a
    # short one a slow pass ran the second attempt too); the test moves the due time itself.
    runner = make_runner(db, tmp_path / "none", registry=registry, retry_backoff=3600.0, retry_max=3600.0)
    (tmp_path / "none").mkdir()
    try:
        runner.start()
        (tid,) = new_targets(db, 1)
        first = runner.run_once()
        assert first.retried == 1 and first.done == 0
        with db.sessions() as s:
            assert repo.tags_of(s, [tid]) == {tid: []}
        _backoff_passes(db)
        drain(runner, db)
        (run,) = [r for r in runs(db, "builtin:tagger") if r.event_id == event_ids(db, "target.created")[0]]
        assert (run.state, run.attempts) == ("done", 2)
        with db.sessions() as s:
            assert repo.tags_of(s, [tid]) == {tid: ["builtin"]}
        assert calls == [tid, tid]
    finally:
        runner.close()


def test_hooks_registered_later_start_after_their_registration(db, tmp_path):
    out = tmp_path / "out.txt"
    new_targets(db, 2, "EARLY")
    write(tmp_path / "hooks", "late.py", """
        from tomd.hooks import on

        @on("target.created")
        def seen(ctx):
            with open(ctx.settings["out"], "a") as f:
                f.write(f"{ctx.event.name}\\n")
    """)
    runner = make_runner(db, tmp_path / "hooks", settings={"late": {"out": str(out)}})
    try:
        runner.start()
        new_targets(db, 1, "LATE")
        drain(runner, db)
        assert lines(out) == ["LATE0"]
        with db.sessions() as s:
            (reg,) = s.scalars(select(OutboxEvent).where(OutboxEvent.kind == "hook.registered")).all()
        assert reg.payload["hook"] == "late.seen" and reg.payload["where"].endswith("late.py:4")
    finally:
        runner.close()


def test_a_bad_hook_file_is_reported_with_file_and_line_and_the_others_load(tmp_path):
    d = tmp_path / "hooks"
    write(d, "good.py", """
        from tomd.hooks import on

        @on("data.stored")
        def ok(ctx):
            pass
    """)
    write(d, "typo.py", """
        from tomd.hooks import on

        @on("data.stord")
        def f(ctx):
            pass
    """)
    write(d, "syntax.py", "def f(:\n    pass\n")
    write(d, "boom.py", "x = 1\nraise SystemExit('no')\n")
    result = load_hooks([d, tmp_path / "missing"])
    assert [s.name for s in result.specs] == ["good.ok"]
    assert result.specs[0].where == f"{d / 'good.py'}:4"
    problems = "\n".join(result.problems)
    assert f"{d / 'typo.py'}:4: ValueError: @on(...): unknown event kind 'data.stord' (did you mean \"data.stored\"?)" \
        in problems
    assert f"{d / 'syntax.py'}:1: SyntaxError" in problems
    assert f"{d / 'boom.py'}:2: SystemExit: no" in problems
    assert f"{tmp_path / 'missing'}: no such file or directory" in problems


def test_reload_reads_changed_hook_files(db, tmp_path):
    out = tmp_path / "out.txt"
    d = tmp_path / "hooks"
    src = """
        from tomd.hooks import on

        @on("target.created")
        def h(ctx):
            with open(ctx.settings["out"], "a") as f:
                f.write("VERSION\\n")
    """
    write(d, "mod.py", src.replace("VERSION", "v1"))
    runner = make_runner(db, d, settings={"mod": {"out": str(out)}})
    stop = threading.Event()
    t = threading.Thread(target=runner.run, args=(stop,), daemon=True)
    try:
        t.start()
        _wait(lambda: runner._started)  # registered: later events are its
        new_targets(db, 1, "A")
        runner.wake()
        _wait(lambda: lines(out) == ["v1"])
        # A different size: an edit of the same size within the second of the last import would
        # match the old .pyc's recorded mtime and size, and Python would run the stale bytecode.
        write(d, "mod.py", src.replace("VERSION", "version 2"))
        runner.reload()
        _wait(lambda: runner._generation == 2)
        new_targets(db, 1, "B")
        runner.wake()
        _wait(lambda: lines(out) == ["v1", "version 2"])
    finally:
        stop.set()
        runner.wake()
        t.join(30)


def test_paced_worker_still_delivers_every_run_and_retry(db, tmp_path):
    """While the ingest keeps committing (a wake every 20 ms), the worker yields (busy_share):
    runs are delayed, never dropped; retries and final failures are recorded as usual."""
    out = tmp_path / "out.txt"
    d = tmp_path / "hooks"
    write(d, "paced.py", """
        from tomd.hooks import on

        @on("target.created", max_attempts=2)
        def ok(ctx):
            with open(ctx.settings["out"], "a") as f:
                f.write(f"{ctx.event_id}\\n")

        @on("target.created", max_attempts=2)
        def bad(ctx):
            raise RuntimeError("always")
    """)
    runner = make_runner(db, d, settings={"paced": {"out": str(out)}}, busy_share=0.05, busy_hold=0.5,
                         claim_batch=3)
    stop, busy = threading.Event(), threading.Event()
    t = threading.Thread(target=runner.run, args=(stop,), daemon=True)

    def ingest_busy() -> None:
        while not busy.is_set():
            runner.wake()
            time.sleep(0.02)

    waker = threading.Thread(target=ingest_busy, daemon=True)
    try:
        t.start()
        _wait(lambda: runner._started)
        waker.start()
        new_targets(db, 12, "P")
        _wait(lambda: len(lines(out)) >= 12, timeout=180)
        busy.set()
        # its registration is a done record; every event's run failed after its 2 attempts
        _wait(lambda: hook_states(db).get("paced.bad") == {"done": 1, "failed": 12}, timeout=180)
        assert len(lines(out)) == len(set(lines(out))) == 12  # each event once
        with db.sessions() as s:
            attempts = s.scalars(select(HookRun.attempts).where(HookRun.hook == "paced.bad",
                                                                HookRun.state == "failed")).all()
        assert attempts == [2] * 12
    finally:
        busy.set()
        stop.set()
        runner.wake()
        t.join(30)


def _backoff_passes(db) -> None:
    """The clock passing: every run waiting for its retry (an hour's backoff) comes due now."""
    with db.sessions.begin() as s:
        waiting = s.scalars(select(HookRun).where(HookRun.state == "pending")).all()
        assert waiting
        for r in waiting:
            assert r.next_attempt_at > datetime.now(timezone.utc) + timedelta(minutes=30)
            r.next_attempt_at = datetime.now(timezone.utc) - timedelta(seconds=1)


def _leases_end(db) -> set[tuple[str, int]]:
    """The clock passing: the claims of a dispatcher that died (long leases) run out now; returns them."""
    with db.sessions.begin() as s:
        claimed = s.scalars(select(HookRun).where(HookRun.state == "running")).all()
        for r in claimed:
            assert r.claimed_until > datetime.now(timezone.utc)  # not over on their own
            r.claimed_until = datetime.now(timezone.utc) - timedelta(seconds=1)
        return {(r.hook, r.event_id) for r in claimed}


def hook_states(db) -> dict[str, dict[str, int]]:
    with db.sessions() as s:
        return repo.hook_run_counts(s)


def _wait(cond, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


# ------------------------------------------------------------- crashes


DISPATCHER = """
import sys, threading
from tomd.db import migrate
from tomd.hooks.runner import HookRunner, RunnerSettings

if __name__ == "__main__":
    url, hooks, out, mode = sys.argv[1:5]
    engine = migrate.connect(url)
    sessions = migrate.sessions(engine)
    # Long limits (the worker's start and each run must never race them on a loaded machine): the
    # test ends the killed dispatcher's leases itself (the clock passing).
    runner = HookRunner(sessions, RunnerSettings(paths=(hooks,), timeout=120.0, lease_margin=30.0, poll=0.1,
                                                 retry_backoff=0.05, settings={"slowrec": {"out": out}}),
                        database_url=url)
    if mode == "forever":
        runner.run(threading.Event())
    else:  # until every run is done
        from sqlalchemy import select, func
        from tomd.db.models import HookRun
        import time
        while True:
            runner.run_once()
            with sessions() as s:
                left = s.scalar(select(func.count()).select_from(HookRun).where(HookRun.state != "done"))
            if not left:
                break
            time.sleep(0.1)
        runner.close()
"""

SLOW_RECORDER = """
    import os, time
    from tomd.hooks import on

    @on("target.created")
    def one(ctx):
        time.sleep(0.03)
        with open(ctx.settings["out"], "a") as f:
            f.write(f"one {ctx.event_id} {os.getpid()}\\n")

    @on("target.created")
    def two(ctx):
        time.sleep(0.03)
        with open(ctx.settings["out"], "a") as f:
            f.write(f"two {ctx.event_id} {os.getpid()}\\n")
"""


def test_after_a_crash_each_hook_gets_each_event_once(db, tmp_path):
    out = tmp_path / "out.txt"
    hooks = tmp_path / "hooks"
    write(hooks, "slowrec.py", SLOW_RECORDER)
    script = tmp_path / "dispatcher.py"
    script.write_text(DISPATCHER)
    # Register the hooks, then commit the events: nothing has been delivered yet.
    first = subprocess.run([sys.executable, str(script), db.url, str(hooks), str(out), "until-done"],
                           cwd=tmp_path, timeout=120, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    new_targets(db, 40)
    events = event_ids(db, "target.created")
    proc = subprocess.Popen([sys.executable, str(script), db.url, str(hooks), str(out), "forever"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait(lambda: len(lines(out)) >= 20, timeout=90)
    finally:
        proc.send_signal(signal.SIGKILL)  # the dispatcher dies mid-run, between commits
        proc.wait(30)
    worker_pid = int(lines(out)[-1].split()[2])
    _wait(lambda: not _alive(worker_pid), timeout=60)  # its worker does not run on without it
    claimed = _leases_end(db)  # one batch, one of them in flight; their leases run out
    assert len(claimed) <= 20  # none if it died between two batches
    done_before = len(lines(out))
    assert done_before < 80
    second = subprocess.run([sys.executable, str(script), db.url, str(hooks), str(out), "until-done"],
                            cwd=tmp_path, timeout=180, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    got = Counter((f"slowrec.{ln.split()[0]}", int(ln.split()[1])) for ln in lines(out))
    assert set(got) == {(f"slowrec.{h}", e) for e in events for h in ("one", "two")}
    # exactly once, except at most the one run killed in flight after its side effect and before its commit
    twice = [k for k, n in got.items() if n > 1]
    assert len(twice) <= 1 and set(twice) <= claimed and max(got.values()) <= 2, twice
    assert all(r.state == "done" for r in runs(db))


HELD_RECORDER = """
    import os, time
    from tomd.hooks import on

    def _record(ctx, name):
        go = ctx.settings["out"] + ".go"
        with open(ctx.settings["out"] + ".started", "a") as f:
            f.write(f"{name} {ctx.event_id}\\n")
        while not os.path.exists(go):  # held: the dispatcher is killed before anything is delivered
            time.sleep(0.01)
        with open(ctx.settings["out"], "a") as f:
            f.write(f"{name} {ctx.event_id} {os.getpid()}\\n")

    @on("target.created")
    def one(ctx):
        _record(ctx, "one")

    @on("target.created")
    def two(ctx):
        _record(ctx, "two")
"""


def test_a_dispatcher_killed_before_any_delivery_delivers_each_pair_exactly_once(db, tmp_path):
    out = tmp_path / "out.txt"
    started = Path(f"{out}.started")
    hooks = tmp_path / "hooks"
    write(hooks, "slowrec.py", HELD_RECORDER)
    script = tmp_path / "dispatcher.py"
    script.write_text(DISPATCHER)
    Path(f"{out}.go").touch()  # registering the hooks delivers nothing (no events yet)
    first = subprocess.run([sys.executable, str(script), db.url, str(hooks), str(out), "until-done"],
                           cwd=tmp_path, timeout=120, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    Path(f"{out}.go").unlink()
    new_targets(db, 10)  # committed: from here on each (hook, event) is owed exactly one delivery
    events = event_ids(db, "target.created")
    proc = subprocess.Popen([sys.executable, str(script), db.url, str(hooks), str(out), "forever"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait(lambda: lines(started), timeout=90)  # a run is claimed and in flight, held before its effect
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert lines(out) == []  # nothing delivered
    claimed = _leases_end(db)
    assert claimed  # the dead dispatcher's claims: taken over once their lease ends (now)
    Path(f"{out}.go").touch()
    second = subprocess.run([sys.executable, str(script), db.url, str(hooks), str(out), "until-done"],
                            cwd=tmp_path, timeout=180, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    got = Counter((f"slowrec.{ln.split()[0]}", int(ln.split()[1])) for ln in lines(out))
    assert got == Counter({(f"slowrec.{h}", e): 1 for e in events for h in ("one", "two")})
    assert all(r.state == "done" for r in runs(db))


SEGFAULT = """
    import ctypes
    from tomd.hooks import on

    @on("target.created", max_attempts=2)
    def crashes(ctx):
        ctypes.string_at(0)  # a segfault in C code: the worker dies by SIGSEGV

    @on("target.created")
    def fine(ctx):
        with open(ctx.settings["out"], "a") as f:
            f.write(f"fine {ctx.event_id}\\n")
"""


def test_a_segfaulting_hook_is_retried_then_failed_and_the_others_run(db, tmp_path):
    out = tmp_path / "out.txt"
    write(tmp_path / "hooks", "seg.py", SEGFAULT)
    runner = make_runner(db, tmp_path / "hooks", settings={"seg": {"out": str(out)}})
    try:
        runner.start()
        new_targets(db, 2)
        events = event_ids(db, "target.created")
        drain(runner, db)
    finally:
        runner.close()
    for r in runs(db, "seg.crashes"):
        if r.event_id in events:
            assert (r.state, r.attempts) == ("failed", 2)
            assert "hook worker died: killed by SIGSEGV" in r.error
    assert sorted(lines(out)) == sorted(f"fine {e}" for e in events)  # each once, in a fresh worker if need be
    assert all(r.state == "done" for r in runs(db, "seg.fine"))
    assert runner._slots[0].worker.starts >= 3  # a fresh worker after each crash


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_two_dispatchers_never_run_a_hook_twice_for_one_event(db, tmp_path):
    out = tmp_path / "out.txt"
    write(tmp_path / "hooks", "rec.py", """
        import time
        from tomd.hooks import on

        @on("target.created")
        def once(ctx):
            time.sleep(0.005)
            with open(ctx.settings["out"], "a") as f:
                f.write(f"{ctx.event_id}\\n")
    """)
    mk = lambda: make_runner(db, tmp_path / "hooks", settings={"rec": {"out": str(out)}}, workers=2)  # noqa: E731
    a, b = mk(), mk()
    stop = threading.Event()
    threads = [threading.Thread(target=r.run, args=(stop,), daemon=True) for r in (a, b)]
    try:
        for t in threads:
            t.start()
        _wait(lambda: a._started and b._started)
        for _ in range(4):
            new_targets(db, 25)
            a.wake()
            b.wake()
        events = event_ids(db, "target.created")
        _wait(lambda: len(lines(out)) >= len(events) and all(r.state == "done" for r in runs(db)), timeout=180)
        time.sleep(0.5)
    finally:
        stop.set()
        a.wake()
        b.wake()
        for t in threads:
            t.join(30)
    got = Counter(int(x) for x in lines(out))
    assert got == Counter(events)


def test_an_event_committed_out_of_id_order_is_still_delivered(db, tmp_path):
    if db.kind != "postgresql":
        pytest.skip("SQLite commits one writer at a time, in id order")
    out = tmp_path / "out.txt"
    write(tmp_path / "hooks", "rec.py", """
        from tomd.hooks import on

        @on("target.created")
        def once(ctx):
            with open(ctx.settings["out"], "a") as f:
                f.write(f"{ctx.event.name}\\n")
    """)
    # An hour's window: however long the drain below takes, the slow cursor cannot move past SLOW's
    # id (with 5 s, a slow drain let it); the test then lets a quarter window pass (the slow rescan's
    # period) instead of sleeping through it.
    runner = make_runner(db, tmp_path / "hooks", settings={"rec": {"out": str(out)}}, commit_window=3600.0)
    try:
        runner.start()
        slow = db.sessions()
        slow.begin()
        t = Target(name="SLOW", ra=1.0, dec=1.0)
        slow.add(t)
        slow.flush()
        repo.add_event(slow, TargetCreated(t.id, "SLOW"), target_id=t.id)  # takes the lower id, commits later
        new_targets(db, 1, "FAST")
        drain(runner, db)
        assert lines(out) == ["FAST0"]  # the fast cursor is now past SLOW's id
        slow.commit()
        slow.close()
        runner._last_slow = time.monotonic() - 900.0  # the clock passing: the slow rescan is due
        _wait(lambda: (runner.run_once(), lines(out))[1] == ["FAST0", "SLOW"], timeout=60)
    finally:
        runner.close()


# ------------------------------------------------------------- commands


def _config(tmp_path: Path, db_url: str, hooks_dir: Path, extra: str = "") -> Path:
    cfg = tmp_path / "tomd.toml"
    cfg.write_text(textwrap.dedent(f"""
        [database]
        url = "{db_url}"
        [storage]
        url = "file://{tmp_path / 'store'}"
        [metrics]
        listen = "127.0.0.1:0"
        [rules]
        paths = ["{tmp_path / 'rules'}"]
        [hooks]
        paths = ["{hooks_dir}"]
        timeout = "4m"  # also the worker's start (at nice 10): never raced on a loaded machine
    """) + textwrap.dedent(extra))
    return cfg


def test_hook_run_and_list_commands(db, tmp_path, capsys):
    from tomd.cli import main

    out = tmp_path / "out.txt"
    d = tmp_path / "hooks"
    write(d, "rec.py", RECORDER)
    write(d, "typo.py", """
        from tomd.hooks import on

        @on("target.creatd")
        def f(ctx):
            pass
    """)
    cfg = _config(tmp_path, db.url, d, f'[hooks.settings.rec]\nout = "{out}"\n')
    (tid,) = new_targets(db, 1)
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"kind": "target.created", "version": 1,
                                 "payload": {"target_id": tid, "name": "T0"}, "id": 1}))
    assert main(["-c", str(cfg), "hook", "run", "rec.first", "--event", str(event)]) == 0
    printed = capsys.readouterr().out
    assert "rec.first: ok" in printed and '"action": "tag"' in printed and "not applied" in printed
    assert lines(out) == ["first 1 T0"]
    with db.sessions() as s:
        assert repo.tags_of(s, [tid]) == {tid: []}
    assert main(["-c", str(cfg), "hook", "run", "rec.first", "--event-id", "1", "--apply"]) == 0
    assert main(["-c", str(cfg), "hook", "run", "rec.first", "--event", str(event), "--apply"]) == 0
    printed = capsys.readouterr().out
    assert "applied: target 1: tagged seen" in printed and "nothing new (already applied)" in printed
    with db.sessions() as s:
        assert repo.tags_of(s, [tid]) == {tid: ["seen"]}
        assert len(list(s.scalars(select(Notification)))) == 1  # the same hook, event and key: queued once
    # a wrong event names the field
    event.write_text(json.dumps({"kind": "target.created", "version": 1, "payload": {"target": 1}}))
    assert main(["-c", str(cfg), "hook", "run", "rec.first", "--event", str(event)]) == 1
    assert f"{event}: payload.target: not a field of target.created v1" in capsys.readouterr().err
    # list: every hook with file:line, the bad file reported, exit 1
    assert main(["-c", str(cfg), "hook", "list"]) == 1
    captured = capsys.readouterr()
    assert f"rec.first  on target.created  ({d / 'rec.py'}:5)" in captured.out
    assert "rec.second  on target.created, target.updated" in captured.out
    assert f"{d / 'typo.py'}:4: ValueError: @on(...): unknown event kind 'target.creatd'" in captured.err


# ------------------------------------------------------ requests: proposal and hours

FACILITIES = """
    [facilities.lab]
    kind = "sim"
    proposal = "SIM2026A-001"
    [facilities.lab.templates.1m-gri]
    filters = ["gp", "rp", "ip"]
    exposure_time = 300
    [facilities.lab.templates.deep]
    proposal = "DEEP-7"
    hours = 2.5
"""

REQUESTER = """
    from tomd.hooks import on

    @on("target.created")
    def ask(ctx):
        for facility, template in ctx.settings["ask"]:
            ctx.request_observation(facility, template, key=template)
"""


def _requests(db):
    from tomd.db.models import ObservationRequest

    with db.sessions() as s:
        return {r.template: (r.facility, r.proposal, r.estimated_hours)
                for r in s.scalars(select(ObservationRequest))}


def test_hook_requests_record_proposal_and_hours_and_unknown_ones_are_refused(db, tmp_path, capsys):
    from tomd.cli import main
    from tomd.config import load_config
    from tomd.hooks.api import apply_actions, facility_map
    from tomd.rules.load import estimate_hours

    d = tmp_path / "hooks"
    write(d, "req.py", REQUESTER)
    cfg = _config(tmp_path, db.url, d, FACILITIES + '[hooks.settings.req]\nask = [["lab", "1m-gri"], '
                                                    '["lab", "deep"]]\n')
    facilities = facility_map(load_config(cfg))
    assert facilities["lab"]["templates"]["deep"] == {"proposal": "DEEP-7", "hours": 2.5}
    (tid,) = new_targets(db, 1)
    assert main(["-c", str(cfg), "hook", "run", "req.ask", "--event-id", "1", "--apply"]) == 0
    hours = estimate_hours({"filters": ["gp", "rp", "ip"], "exposure_time": 300})
    assert _requests(db) == {"1m-gri": ("lab", "SIM2026A-001", pytest.approx(hours)),
                             "deep": ("lab", "DEEP-7", 2.5)}
    # an unknown facility or template: nothing applied, the reason names them
    for ask, says in (([["nowhere", "1m-gri"]], "no facility 'nowhere' in the config's [facilities] (known: lab)"),
                      ([["lab", "2m-deep"]], "facility lab has no template '2m-deep' (known: 1m-gri, deep)")):
        action = {"action": "request", "target_id": tid, "facility": ask[0][0], "template": ask[0][1],
                  "name": f"x-{ask[0][1]}"}
        with pytest.raises(ValueError, match=says.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                           .replace("]", r"\]")):
            with db.sessions.begin() as s:
                apply_actions(s, [action], hook="req.ask", event_id=1, facilities=facilities)
    assert len(_requests(db)) == 2


def test_obs_submit_records_proposal_and_hours(db, run):  # noqa: F811 - tests.test_facilities_cli's fixture
    from tomd.rules.load import estimate_hours

    code, _, err = run("obs", "submit", "SN 2026abc", "--facility", "lab", "--template", "1m-gri")
    assert code == 0, err
    hours = estimate_hours({"instrument_type": "1M0-SCICAM-SINISTRO", "filters": ["gp", "rp", "ip"],
                            "exposure_time": 300})
    # (the facility's own estimate may replace tomd's once submitted)
    assert _requests(db) == {"1m-gri": ("lab", "SIM2026A-001", pytest.approx(hours, rel=0.1))}


def test_every_event_kind_is_documented_for_hook_writers():
    from tomd.events import EVENT_TYPES

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Hooks"):readme.index("### Notifications")]
    missing = [k for k in EVENT_TYPES if f"| `{k}` v{EVENT_TYPES[k].version} |" not in section]
    assert not missing, f"README.md, ### Hooks: add {missing} to the table of events"


def test_the_daemon_hook_worker_fills_and_checks_requests(db, tmp_path):
    from tomd.config import load_config

    d = tmp_path / "hooks"
    write(d, "req.py", REQUESTER)
    cfg = load_config(_config(tmp_path, db.url, d, FACILITIES + '[hooks.settings.req]\nask = [["lab", "deep"]]\n'
                              '[hooks.settings.wrong]\nask = [["lab", "deep"], ["lab", "2m-deep"]]\n'))
    write(d, "wrong.py", REQUESTER.replace('@on("target.created")', '@on("target.created", max_attempts=1)'))
    runner = HookRunner.from_config(cfg, db.sessions)
    try:
        runner.start()
        new_targets(db, 1)
        drain(runner, db)
    finally:
        runner.close()
    assert _requests(db) == {"deep": ("lab", "DEEP-7", 2.5)}  # the wrong hook's first request is not applied
    (event,) = event_ids(db, "target.created")
    (wrong,) = [r for r in runs(db, "wrong.ask") if r.event_id == event]
    assert wrong.state == "failed"
    assert "facility lab has no template '2m-deep' (known: 1m-gri, deep)" in wrong.error
    assert [r.state for r in runs(db, "req.ask") if r.event_id == event] == ["done"]
