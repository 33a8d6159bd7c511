"""A data iterator that never leaves the training loop stuck: dead workers, stop requests, orphans.

Grain's `mp_prefetch` can block the main thread forever when a worker process dies
abruptly (SIGKILL from the out-of-memory killer, say). Each worker sends its elements
through a multiprocessing queue, i.e. a pipe, read by a per-worker grain thread of the
main process. Arrays travel through shared memory, so most messages are small; but a
message larger than the pipe's buffer (64 KiB: anything grain pickles whole) is written in
pieces while the reader is not keeping up, and a worker killed mid-write leaves half of it
in the pipe. The reading thread then blocks in `os.read` for the rest; no EOF ever comes,
because the main process itself holds the pipe's write end. Grain checks the worker's exit
code only after a read times out with *nothing* to read, so it never does, and the main
thread waits, with no timeout, on that thread's queue. A SIGTERM handler runs during that
wait, but the loop never gets control back to act on its flag, so nothing is saved. Nor do
workers notice their parent's death: they retry putting into a full queue forever.

`LoaderIterator` therefore calls the grain iterator from a background thread and waits for
each element in short slices; between slices it asks the caller's `should_stop()` and checks
the workers, which `WorkerGuard` (grain's `worker_init_fn`) has named so they can be found,
and which it makes exit when the main process is gone. Typical use::

    guard = WorkerGuard()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=2), worker_init_fn=guard)
    it = LoaderIterator(iter(ds), guard=guard, should_stop=lambda: flag.is_set())
    it.set_state(saved)            # optional, before the first next()
    try:
        batch = next(it)           # LoaderStopped / LoaderWorkerDied / StopIteration
        state = it.get_state()     # position right after `batch`
    finally:
        it.close()
"""
from __future__ import annotations

import copy
import itertools
import multiprocessing.process
import os
import queue
import re
import signal
import threading
import time
from typing import Any, Callable, Iterator, Optional

from jaxllava.errors import JaxllavaError

_COMM = "jxl-w{index}-{token}"  # at most 15 characters: the kernel truncates longer names
_COMM_RE = re.compile(r"^jxl-w(\d+)-([0-9a-f]{4})$")
_TOKENS = itertools.count()
# Grain's own diagnosis when it does notice a dead worker: the only place a status survives
# if the worker was reaped before this module had seen it.
_GRAIN_EXIT_RE = re.compile(r"terminated unexpectedly with exit code (-?\d+)")


class LoaderWorkerDied(JaxllavaError):
    """A data-loader worker process ended abnormally; the elements it owed will never come."""

    def __init__(self, index: Optional[int], pid: Optional[int], *, signal_number: Optional[int] = None,
                 exit_code: Optional[int] = None):
        who = "data loader worker" + (f" {index}" if index is not None else "") + (
            f" (pid {pid})" if pid is not None else "")
        if signal_number is not None:
            how = f"was killed by signal {_signal_name(signal_number)}"
            if signal_number == signal.SIGKILL:
                how += (" (usually the kernel's out-of-memory killer: see `dmesg`; lower data.num_workers or "
                        "data.prefetch, or give the job more memory)")
        elif exit_code is not None:
            how = f"exited with code {exit_code} (its traceback, if any, is in the log above)"
        else:
            how = "ended with an unknown status"
        super().__init__(f"{who} {how}. The data it was preparing is lost; the run can be resumed "
                         f"from its latest checkpoint by rerunning the same command with the same workdir.")
        self.index, self.pid, self.signal_number, self.exit_code = index, pid, signal_number, exit_code


class LoaderStopped(Exception):
    """`should_stop()` turned true while `LoaderIterator.__next__` waited: no element was consumed."""


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"{number}"


class WorkerGuard:
    """Grain's `worker_init_fn(worker_index, worker_count)`: names the worker and ties its life to ours.

    Pickled into each worker by grain; created in the main process, whose pid it records
    there (a worker that read `os.getppid()` at start could already see a reaper's pid)."""

    def __init__(self, poll_s: float = 0.5):
        self.parent_pid = os.getpid()
        # Tells this guard's workers apart from those of another loader in the same process
        # (only this process's children are ever looked at).
        self.token = f"{next(_TOKENS) % 0x10000:04x}"
        self.poll_s = poll_s

    def __call__(self, worker_index: int, worker_count: int) -> None:
        # The name is how the main process finds and reports its workers, and what the kernel's
        # OOM-killer message and `ps` show.
        try:
            with open("/proc/self/comm", "w") as f:
                f.write(_COMM.format(index=worker_index, token=self.token))
        except OSError:
            pass  # not Linux: the iterator still works, only without liveness checks
        # Ctrl-C reaches the whole process group; the main process decides what it means and
        # stops the workers itself. A worker dying of it would read as a crash.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if os.getppid() != self.parent_pid:
            os._exit(1)
        # A polling thread rather than prctl(PR_SET_PDEATHSIG): that fires when the *thread* that
        # started the process ends, and grain starts workers from pool and prefetch threads that
        # end while the workers should go on (a set_state restarts them, for one). Reparenting,
        # what the poll sees, happens only when the whole main process is gone, however it died.
        threading.Thread(target=_exit_when_orphaned, args=(self.parent_pid, self.poll_s), daemon=True,
                         name="jaxllava-parent-watch").start()

    def owns(self, comm: str) -> Optional[int]:
        """The worker index if a process name is one this guard gave, else None."""
        m = _COMM_RE.match(comm)
        return int(m.group(1)) if m and m.group(2) == self.token else None


def _exit_when_orphaned(parent_pid: int, poll_s: float) -> None:
    while os.getppid() == parent_pid:
        time.sleep(poll_s)
    os._exit(1)


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _child_processes() -> dict[int, Optional[multiprocessing.process.BaseProcess]]:
    """pid -> multiprocessing Process (None where only /proc knows the child)."""
    children = getattr(multiprocessing.process, "_children", None)
    if children is not None:
        try:
            return {p.pid: p for p in set(children) if p.pid}
        except RuntimeError:  # resized by another thread while copied; the next check sees it
            return {}
    found: dict[int, Optional[multiprocessing.process.BaseProcess]] = {}
    base = f"/proc/{os.getpid()}/task"
    for tid in os.listdir(base):
        for pid in (_read(f"{base}/{tid}/children") or "").split():
            found[int(pid)] = None
    return found


def _exit_status(pid: int, process) -> Optional[tuple[Optional[int], Optional[int]]]:
    """(signal, exit code) of a child that has ended, None while it runs.

    WNOWAIT leaves the zombie for multiprocessing to reap: grain's own exit-code check and
    its join read the status from there. Once they have reaped it, the Process object we
    hold has the status cached."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        code = process.exitcode if process is not None else None
        if code is None:
            return (None, None)
        return (-code, None) if code < 0 else (None, code)
    if info is None:
        return None
    if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED):
        return (info.si_status, None)
    return (None, info.si_status)


class _Workers:
    """The guard's worker processes: found by name, checked without reaping, killed on close."""

    def __init__(self, guard: WorkerGuard):
        self.guard = guard
        self.known: dict[int, tuple[int, Any]] = {}  # pid -> (index, Process or None)
        self._ignored: set[int] = set()  # another guard's workers, and ours that ended cleanly

    def refresh(self) -> None:
        for pid, process in _child_processes().items():
            if pid in self.known or pid in self._ignored:
                continue
            comm = _read(f"/proc/{pid}/comm")
            if comm is None:
                continue
            index = self.guard.owns(comm)
            if index is not None:
                self.known[pid] = (index, process)
            elif _COMM_RE.match(comm):
                self._ignored.add(pid)
            # Any other name: a worker still starting (not yet named) or an unrelated child; asked again.

    def dead(self) -> Optional[LoaderWorkerDied]:
        self.refresh()
        for pid, (index, process) in sorted(self.known.items(), key=lambda kv: kv[1][0]):
            status = _exit_status(pid, process)
            if status is None:
                continue
            sig, code = status
            if sig is None and not code:
                del self.known[pid]  # a clean exit (grain stopping it) or a status nobody kept
                self._ignored.add(pid)
                continue
            return LoaderWorkerDied(index, pid, signal_number=sig, exit_code=code)
        return None

    def pids(self) -> dict[int, int]:
        self.refresh()
        return {index: pid for pid, (index, _) in self.known.items()}

    def kill_alive(self) -> None:
        for pid, (_, process) in list(self.known.items()):
            if _exit_status(pid, process) is None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


class LoaderIterator:
    """Wraps a checkpointable iterator (`get_state`/`set_state`) so that `next()` never blocks forever.

    `__next__` returns the next element, or raises: `StopIteration` at the end;
    `LoaderStopped` when `should_stop()` (read between waits of `poll_s`, only while no element
    is ready) is true, after which `next()` may be called again; `LoaderWorkerDied` when a
    worker named by `guard` has died, then again on every later call; or whatever the data
    raised. `get_state()` is the position right after the last element returned, whatever the
    background thread has read ahead, so saving it after consuming an element resumes at the next.
    """

    def __init__(self, iterator: Iterator, *, guard: Optional[WorkerGuard] = None,
                 should_stop: Optional[Callable[[], bool]] = None, poll_s: float = 0.25,
                 close_timeout_s: float = 10.0):
        self._it = iterator
        self.should_stop = should_stop
        self._poll_s = poll_s
        self._close_timeout_s = close_timeout_s
        self._workers = _Workers(guard) if guard is not None else None
        # One element read ahead is enough: grain buffers the rest, and every element held
        # here is one more the background thread has taken from the iterator.
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._closing = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._state = None
        self._failure: Optional[BaseException] = None
        self._ended = False
        self._closed = False

    def __iter__(self) -> "LoaderIterator":
        return self

    # -- state

    def get_state(self) -> dict:
        if self._state is None:
            self._state = copy.deepcopy(self._it.get_state())  # nothing read yet: only this thread uses it
        return copy.deepcopy(self._state)

    def set_state(self, state: dict) -> None:
        if self._thread is not None:
            raise RuntimeError("LoaderIterator.set_state after iteration began; make a new iterator to restore")
        self._it.set_state(state)
        self._state = copy.deepcopy(state)

    def worker_pids(self) -> dict[int, int]:
        """Worker index -> pid of the workers seen so far (they start on the first `next()`)."""
        return self._workers.pids() if self._workers is not None else {}

    # -- iteration

    def _fetch(self) -> None:
        it, out, closing = self._it, self._queue, self._closing
        while not closing.is_set():
            try:
                element = next(it)
                item = ("element", element, copy.deepcopy(it.get_state()))
            except StopIteration:
                item = ("end", None, None)
            except BaseException as error:  # noqa: BLE001 - handed to the main thread as is
                item = ("error", error, None)
            while not closing.is_set():
                try:
                    out.put(item, timeout=self._poll_s)
                    break
                except queue.Full:
                    pass
            if item[0] != "element":
                return

    def __next__(self):
        if self._closed:
            raise ValueError("LoaderIterator is closed")
        if self._failure is not None:
            raise self._failure
        if self._ended:
            raise StopIteration
        if self._thread is None:
            self.get_state()  # the position before the first element, while this thread may still ask
            self._thread = threading.Thread(target=self._fetch, daemon=True, name="jaxllava-loader")
            self._thread.start()
        if self._workers is not None:
            # Learn the workers' pids while they live (a dict lookup once all are known): once grain
            # has noticed a death and reaped the process, only a pid seen before can be named.
            self._workers.refresh()
        while True:
            try:
                kind, value, state = self._queue.get(timeout=self._poll_s)
            except queue.Empty:
                if self.should_stop is not None and self.should_stop():
                    raise LoaderStopped("stop requested while waiting for data") from None
                self._check_workers()
                continue
            if kind == "element":
                self._state = state
                return value
            if kind == "end":
                self._ended = True
                raise StopIteration
            self._check_workers(cause=value)
            self._failure = value
            raise value

    def _check_workers(self, cause: Optional[BaseException] = None) -> None:
        died = self._workers.dead() if self._workers is not None else None
        if died is None and cause is not None:
            m = _GRAIN_EXIT_RE.search(str(cause))
            if m:  # grain noticed a worker this iterator had not seen yet
                code = int(m.group(1))
                died = LoaderWorkerDied(None, None, signal_number=-code if code < 0 else None,
                                        exit_code=code if code >= 0 else None)
        if died is None:
            return
        if died.signal_number in (signal.SIGTERM, signal.SIGHUP) and self.should_stop is not None:
            # Sent to the whole job (a scheduler's preemption): the main process's own signal
            # is on its way, and a requested stop is not a crash.
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                if self.should_stop():
                    raise LoaderStopped(f"stop requested; {died}") from cause
                time.sleep(0.05)
        self._failure = died
        raise died from cause

    def close(self) -> None:
        """Stops the background thread and the workers; returns within about `close_timeout_s`."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        try:
            while True:
                self._queue.get_nowait()  # frees a put in progress
        except queue.Empty:
            pass
        workers = self._workers
        if workers is not None:
            workers.refresh()
        died = isinstance(self._failure, LoaderWorkerDied)
        if died and workers is not None:
            # The survivors would only finish writing elements nobody will read: grain's close
            # waits up to 25 s for each of them.
            workers.kill_alive()
        close = getattr(self._it, "close", None)
        if close is not None:
            # Grain's close joins its threads without a timeout, and after a death one of them
            # stays blocked on the dead worker's pipe: it runs in a thread of its own, waited
            # for only as long as it can still help.
            closer = threading.Thread(target=close, daemon=True, name="jaxllava-loader-close")
            closer.start()
            closer.join(timeout=min(1.0, self._close_timeout_s) if died else self._close_timeout_s)
        if workers is not None:
            workers.kill_alive()
        if self._thread is not None:
            self._thread.join(timeout=self._poll_s)  # gone unless blocked inside the grain iterator
