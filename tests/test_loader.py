"""LoaderIterator: a killed worker ends iteration with a diagnosis, a killed main process leaves no
workers, the state handed with each element resumes exactly, and a stop request is heard while
the data is blocked.

Grain workers run in a child Python process started here, so that a hang cannot hang pytest
and so that killing that process is the orphan case.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time

import pytest

from jaxllava.data.loader import LoaderIterator, LoaderStopped, LoaderWorkerDied, WorkerGuard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Elements are {"i": index, "pad": bytes}: `pad` is not a numpy array, so grain pickles it through
# the worker's pipe. 1 MB does not fit the pipe's 64 KiB buffer, so a worker with a full queue is
# always blocked mid-message: killing it then is what hangs plain grain forever.
CHILD = r'''
import json, os, sys, time, faulthandler
faulthandler.dump_traceback_later(float(os.environ["CHILD_LIMIT_S"]), exit=True)

import grain
from absl import flags
from jaxllava.data.loader import LoaderIterator, LoaderWorkerDied, WorkerGuard

PAD = int(os.environ["PAD"])


def make(i):
    time.sleep(0.01)
    return {"i": i, "pad": bytes(PAD)}


def say(**event):
    print(json.dumps(event), flush=True)


def spawn_children():
    """pid -> comm of this process's children started by multiprocessing's spawn, from /proc."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as f:
            for pid in f.read().split():
                with open(f"/proc/{pid}/cmdline", "rb") as g:
                    if b"spawn_main" in g.read():
                        with open(f"/proc/{pid}/comm") as h:
                            out[pid] = h.read().strip()
    return out


if __name__ == "__main__":
    mode, first = sys.argv[1], int(sys.argv[2])
    flags.FLAGS.mark_as_parsed()

    def loader():
        guard = WorkerGuard()
        ds = (grain.MapDataset.source(list(range(10_000))).map(make)
              .to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
              .mp_prefetch(grain.MultiprocessingOptions(num_workers=2, per_worker_buffer_size=2),
                           worker_init_fn=guard))
        return LoaderIterator(iter(ds), guard=guard)

    it = loader()
    seen = [next(it)["i"] for _ in range(first)]
    time.sleep(0.5)  # the workers fill their queues and block mid-message
    say(event="ready", seen=seen, pids=it.worker_pids(), children=spawn_children())
    if mode == "orphan":
        while True:
            time.sleep(1)
    sys.stdin.readline()  # the test has killed a worker
    try:
        while True:
            seen.append(next(it)["i"])
    except LoaderWorkerDied as e:
        state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
        say(event="died", message=str(e), index=e.index, pid=e.pid, signal=e.signal_number, seen=seen,
            t=time.monotonic())
        it.close()
    # Resuming: a new loader, new workers, the saved state.
    say(event="closed")
    it = loader()
    it.set_state(state)
    say(event="resumed", seen=[next(it)["i"] for _ in range(5)])
    it.close()
    sys.exit(3)
'''


def _child(tmp_path, mode, first, pad):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, PAD=str(pad), CHILD_LIMIT_S="60", PYTHONPATH=ROOT)
    # stderr to a file: grain and the resource tracker of a killed child write there after the test.
    with open(tmp_path / "child.err", "w") as err:
        proc = subprocess.Popen([sys.executable, str(script), mode, str(first)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, env=env, cwd=ROOT)
    proc.err_path, proc.pending = tmp_path / "child.err", b""
    return proc


def _read_event(proc, timeout_s):
    """The child's next JSON line. select() bounds the wait; a reading thread could outlive a
    failed test and block the pipe's close (the workers hold its write end too)."""
    deadline = time.monotonic() + timeout_s
    while b"\n" not in proc.pending:
        left = deadline - time.monotonic()
        ready = select.select([proc.stdout], [], [], max(0.0, left))[0] if left > 0 else []
        chunk = os.read(proc.stdout.fileno(), 65536) if ready else b""
        if not chunk:
            tail = proc.err_path.read_text()[-3000:]
            pytest.fail(f"no event from the child within {timeout_s} s (exit code {proc.poll()}); stderr:\n{tail}")
        proc.pending += chunk
    line, proc.pending = proc.pending.split(b"\n", 1)
    return json.loads(line)


def _start_time(pid: int):
    """The process's start time, or None once it is gone or a zombie (a recycled pid differs)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in "ZX" else fields[19]


def _wait_gone(pids_starts: dict, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = {p: s for p, s in pids_starts.items() if s is not None and _start_time(p) == s}
        if not alive:
            return {}
        time.sleep(0.1)
    return alive


def _kill_leftovers(pids_starts: dict) -> None:
    for pid, start in pids_starts.items():
        if start is not None and _start_time(pid) == start:
            os.kill(pid, signal.SIGKILL)


def _stop(proc) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
    proc.stdout.close()
    proc.stdin.close()


def test_killed_worker_raises_naming_it_and_the_run_resumes_exactly(tmp_path):
    first = 6
    proc = _child(tmp_path, "kill", first, pad=1_000_000)
    workers = {}
    try:
        ready = _read_event(proc, 30)
        assert ready["seen"] == list(range(first))
        pids = {int(i): p for i, p in ready["pids"].items()}
        # The loader's worker table agrees with what /proc says the process spawned.
        assert sorted(pids) == [0, 1]
        assert {str(p) for p in pids.values()} == set(ready["children"])
        workers = {p: _start_time(p) for p in pids.values()}
        os.kill(pids[1], signal.SIGKILL)
        killed_at = time.monotonic()
        proc.stdin.write(b"go\n")
        proc.stdin.flush()

        died = _read_event(proc, 30)
        assert died["event"] == "died"
        assert died["t"] - killed_at < 10  # CLOCK_MONOTONIC is one clock for all processes on Linux
        assert (died["index"], died["pid"], died["signal"]) == (1, pids[1], signal.SIGKILL)
        assert f"worker 1 (pid {pids[1]})" in died["message"] and "SIGKILL" in died["message"]
        assert "resumed" in died["message"]
        seen = died["seen"]
        assert seen == list(range(len(seen))) and len(seen) >= first

        assert _read_event(proc, 20)["event"] == "closed"
        assert not _wait_gone(workers, 2), "a worker outlived the closed loader"
        resumed = _read_event(proc, 30)
        assert resumed["seen"] == list(range(len(seen), len(seen) + 5))
        assert proc.wait(timeout=20) == 3
    finally:
        _stop(proc)
        _kill_leftovers(workers)


def test_killed_main_process_leaves_no_workers(tmp_path):
    proc = _child(tmp_path, "orphan", 3, pad=16)
    workers = {}
    try:
        ready = _read_event(proc, 30)
        pids = [int(p) for p in ready["children"]]
        assert len(pids) == 2 and sorted(map(int, ready["pids"].values())) == sorted(pids)
        workers = {p: _start_time(p) for p in pids}
        assert all(workers.values())
        proc.kill()
        proc.wait(timeout=10)
        alive = _wait_gone(workers, 5)
        assert not alive, f"workers {sorted(alive)} outlived their killed parent"
    finally:
        _stop(proc)
        _kill_leftovers(workers)


def _numbers(n, fn=None):
    import grain

    return (grain.MapDataset.source(list(range(n))).map(fn or (lambda i: {"i": i}))
            .to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def test_state_after_each_element_restores_the_following_elements():
    expected = list(range(40))
    for k in (0, 1, 7, 39, 40):
        it = LoaderIterator(iter(_numbers(40)))
        try:
            assert [next(it)["i"] for _ in range(k)] == expected[:k]
            time.sleep(0.05)  # let the background thread read ahead: the state must not follow it
            state = it.get_state()
            rest = [e["i"] for e in it]
        finally:
            it.close()
        assert rest == expected[k:]
        again = LoaderIterator(iter(_numbers(40)))
        try:
            again.set_state(state)
            assert [e["i"] for e in again] == expected[k:]
        finally:
            again.close()


def test_stop_request_while_the_data_is_blocked_returns_control():
    gate = threading.Event()

    def blocking(i):
        if i == 3:
            gate.wait(timeout=30)
        return {"i": i}

    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    it = LoaderIterator(iter(_numbers(10, blocking)), should_stop=stop.is_set, poll_s=0.1)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        assert [next(it)["i"] for _ in range(3)] == [0, 1, 2]
        state = it.get_state()
        timer.start()
        started = time.monotonic()
        with pytest.raises(LoaderStopped):
            next(it)
        assert time.monotonic() - started < 3
        assert stop.is_set() and it.get_state() == state
        # Nothing was lost: once the data flows again, iteration goes on where it stopped.
        stop.clear()
        gate.set()
        assert next(it)["i"] == 3
    finally:
        timer.cancel()
        timer.join(timeout=5)
        gate.set()
        signal.signal(signal.SIGTERM, previous)
        it.close()


def test_set_state_after_iteration_began_is_refused():
    it = LoaderIterator(iter(_numbers(5)))
    try:
        state = it.get_state()
        next(it)
        with pytest.raises(RuntimeError, match="make a new iterator"):
            it.set_state(state)
    finally:
        it.close()


def _named_worker(guard, index, exit_code):
    guard(index, index + 1)
    if exit_code is None:
        time.sleep(30)
    os._exit(exit_code)


class _Blocked:
    """An iterator whose data never comes, as when grain waits on a dead worker's pipe."""

    def __init__(self):
        self.release = threading.Event()

    def __next__(self):
        self.release.wait(timeout=30)
        raise StopIteration

    def get_state(self):
        return {}

    def close(self):
        self.release.set()


def _loader_watching(guard, index, exit_code=None, **kw):
    import multiprocessing

    worker = multiprocessing.get_context("spawn").Process(target=_named_worker, args=(guard, index, exit_code),
                                                          daemon=True)
    worker.start()
    it = LoaderIterator(_Blocked(), guard=guard, poll_s=0.05, **kw)
    deadline = time.monotonic() + 20
    while it.worker_pids() != {index: worker.pid}:
        assert time.monotonic() < deadline, "the worker never took its name"
        time.sleep(0.02)
    return worker, it


def test_death_is_diagnosed_after_multiprocessing_reaped_the_worker():
    # Grain's own exit-code check reaps the worker; the status must survive that.
    worker, it = _loader_watching(WorkerGuard(), 3)
    try:
        worker.kill()
        worker.join(timeout=10)
        started = time.monotonic()
        with pytest.raises(LoaderWorkerDied, match=rf"worker 3 \(pid {worker.pid}\) was killed by signal SIGKILL"):
            next(it)
        assert time.monotonic() - started < 5
        with pytest.raises(LoaderWorkerDied):  # and it stays failed
            next(it)
    finally:
        it.close()
        worker.join(timeout=10)


def test_exit_codes_are_reported_and_clean_exits_are_not():
    guard = WorkerGuard()
    crashed, it = _loader_watching(guard, 0, exit_code=7)
    try:
        with pytest.raises(LoaderWorkerDied, match=rf"worker 0 \(pid {crashed.pid}\) exited with code 7"):
            next(it)
    finally:
        it.close()
        crashed.join(timeout=10)
    stop = threading.Event()
    finished, it = _loader_watching(guard, 1, exit_code=0, should_stop=stop.is_set)
    try:
        finished.join(timeout=10)
        timer = threading.Timer(0.5, stop.set)
        timer.start()
        with pytest.raises(LoaderStopped):  # still waiting for data, not a death
            next(it)
        timer.join(timeout=5)
    finally:
        it.close()


def test_close_is_bounded_and_kills_the_workers_when_the_iterator_cannot_close():
    worker, it = _loader_watching(WorkerGuard(), 0, close_timeout_s=1.0)
    hang = threading.Event()
    it._it.close = lambda: hang.wait(timeout=30)  # grain's close stuck joining a thread
    try:
        started = time.monotonic()
        it.close()
        assert time.monotonic() - started < 4
        worker.join(timeout=10)
        assert worker.exitcode == -signal.SIGKILL
    finally:
        hang.set()
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=10)


def test_workers_of_another_loader_are_not_watched():
    mine, theirs = WorkerGuard(), WorkerGuard()
    worker, it = _loader_watching(theirs, 0)
    try:
        assert LoaderIterator(_Blocked(), guard=mine).worker_pids() == {}
        assert mine.owns(f"jxl-w0-{theirs.token}") is None and theirs.owns(f"jxl-w0-{theirs.token}") == 0
    finally:
        it.close()
        worker.join(timeout=10)


def test_sigterm_to_the_whole_job_is_a_stop_not_a_crash():
    # A scheduler's SIGTERM reaches the workers too; the main process's arrives a moment later.
    stop = threading.Event()
    worker, it = _loader_watching(WorkerGuard(), 0, should_stop=stop.is_set)
    timer = threading.Timer(0.3, stop.set)
    try:
        worker.terminate()
        worker.join(timeout=10)
        timer.start()
        with pytest.raises(LoaderStopped, match="SIGTERM"):
            next(it)
    finally:
        timer.cancel()
        it.close()


class _Failing(_Blocked):
    def __init__(self, error):
        super().__init__()
        self.error = error

    def __next__(self):
        raise self.error


def test_errors_from_the_data_pass_through_and_grain_own_diagnosis_is_kept():
    bad = ValueError("record 7: bad image")
    it = LoaderIterator(_Failing(bad), guard=WorkerGuard())
    with pytest.raises(ValueError) as raised:
        next(it)
    assert raised.value is bad
    it.close()
    # A worker grain found dead before this iterator had seen it: no index or pid to name.
    grain_error = RuntimeError("Worker process was terminated unexpectedly with exit code -9. Search the logs")
    it = LoaderIterator(_Failing(grain_error), guard=WorkerGuard())
    with pytest.raises(LoaderWorkerDied, match="killed by signal SIGKILL") as raised:
        next(it)
    assert raised.value.__cause__ is grain_error and raised.value.index is None
    it.close()
