"""Workers started by fork from a process that has already imported them.

A worker is a whole appliance: starting one as a new interpreter costs about 1.5 s of
CPU in imports before it serves anything, at every start and every restart. The
supervisor stays small (it never imports the pipeline, SQLAlchemy or the control
plane), so it cannot fork workers itself. It starts one **fork server** instead
(``postwarden forkserver``, a command not listed in the help, as
Python's ``multiprocessing`` forkserver and gunicorn's ``--preload`` do): a process
that imports the worker's code once, then waits, single-threaded and with no event
loop, for requests on a pipe. For each one it forks, the child forks the worker and
exits at once, and the worker, orphaned, is adopted by the supervisor, which is a
*child subreaper* (``PR_SET_CHILD_SUBREAPER``): a worker is still the supervisor's
child, waited for, signalled and killed with it (``PR_SET_PDEATHSIG``) exactly as one
it started by ``exec``; only its start is cheap (tens of milliseconds), and its pages
are shared with the fork server's until written. The supervisor watches each worker
through a pidfd. The ``db`` step before the workers start (migrations) runs in a
forked child as well.

If the fork server cannot start, dies, or the kernel has no subreapers or pidfds, the
supervisor starts workers by ``exec`` as before (``server.fork_workers = false``
chooses that). A worker's command line (``ps``, ``pgrep -f``) reads as it did:
``python -m postwarden.cli worker --index N …`` (``setproctitle``).

The protocol: one JSON object a line each way. ``{"argv": [...], "env": {...}}``
starts a worker running ``postwarden.cli`` with ``argv`` in environment ``env`` and
answers ``{"pid": N}``; ``{"run": [...], "env": {...}}`` runs a command to its end and
answers ``{"code": C, "out": "..."}`` (its output). The server's first line is
``{"ready": true}``, or ``{"ready": false, "why": "..."}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

log = logging.getLogger("postwarden.forkserver")

PR_SET_CHILD_SUBREAPER = 36
ADOPTION_TIMEOUT = 10.0  # seconds a new worker waits to be the supervisor's child


def become_subreaper() -> bool:
    """Make this process adopt its orphaned descendants (Linux 3.4+)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def usable() -> bool:
    """Whether this kernel and Python can watch a process through a pidfd."""
    if not hasattr(os, "pidfd_open") or not hasattr(signal, "pidfd_send_signal"):
        return False
    try:
        fd = os.pidfd_open(os.getpid())
    except OSError:
        return False
    os.close(fd)
    return True


# ------------------------------------------------------------------ supervisor side


class ForkedProcess:
    """A worker the fork server started and the supervisor adopted: what the
    supervisor uses of :class:`asyncio.subprocess.Process` (``pid``, ``returncode``,
    ``wait``, ``send_signal``, ``kill``), through a pidfd (a signal never reaches
    another process that took the pid over)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._loop = asyncio.get_running_loop()
        self._done: asyncio.Future[int] = self._loop.create_future()
        self._fd: int | None = os.pidfd_open(pid)
        self._loop.add_reader(self._fd, self._exited)

    def _exited(self) -> None:
        if self._fd is None:
            return
        self._loop.remove_reader(self._fd)
        try:
            _, status = os.waitpid(self.pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:  # not adopted (cannot happen with a subreaper)
            code = 255
        os.close(self._fd)
        self._fd = None
        self.returncode = code
        if not self._done.done():
            self._done.set_result(code)

    async def wait(self) -> int:
        return await asyncio.shield(self._done)

    def send_signal(self, sig: int) -> None:
        if self._fd is None:
            raise ProcessLookupError(self.pid)
        signal.pidfd_send_signal(self._fd, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The supervisor's handle on its fork server."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.StreamReader | None = None
        self._out = -1
        self._lock = asyncio.Lock()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self, pass_fds: list[int], env: dict[str, str], within: float = 60) -> bool:
        """Start the server and wait for it to be ready; False (and a warning) when it
        cannot serve, so that workers are started by ``exec``."""
        if not (usable() and become_subreaper()):
            log.warning("event=fork_server_unavailable why=no_pidfd_or_subreaper")
            return False
        req_r, req_w = os.pipe()
        ans_r, ans_w = os.pipe()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "postwarden.cli", "forkserver", "--requests", str(req_r),
                "--answers", str(ans_w), "--parent", str(os.getpid()),
                pass_fds=[*pass_fds, req_r, ans_w], env=env,
            )  # fmt: skip
        finally:
            os.close(req_r)
            os.close(ans_w)
        self._out = req_w
        loop = asyncio.get_running_loop()
        reader = self._reader = asyncio.StreamReader(limit=1 << 24)
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(ans_r, "rb", 0)
        )
        try:
            first = await asyncio.wait_for(self._answer(), within)
        except (TimeoutError, ConnectionError, ValueError) as exc:
            log.warning("event=fork_server_unavailable why=%r", str(exc) or type(exc).__name__)
            await self.stop()
            return False
        if not first.get("ready"):
            log.warning("event=fork_server_unavailable why=%r", first.get("why", ""))
            await self.stop()
            return False
        log.info("event=fork_server_ready pid=%d", self.proc.pid)
        return True

    async def _answer(self) -> dict[str, Any]:
        assert self._reader is not None
        line = await self._reader.readline()
        if not line:
            raise ConnectionError("the fork server exited")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def _ask(self, request: dict[str, Any], within: float) -> dict[str, Any]:
        if not self.alive:
            raise ConnectionError("the fork server is not running")
        async with self._lock:
            # Small, and read at once by a server that waits for it: written here
            # (no executor thread in the supervisor; see _start_worker on why).
            _say(self._out, request)
            return await asyncio.wait_for(self._answer(), within)

    async def spawn(self, argv: list[str], env: dict[str, str]) -> ForkedProcess:
        """Start a worker running ``postwarden.cli argv`` (ConnectionError, OSError or
        TimeoutError when the server cannot)."""
        answer = await self._ask({"argv": argv, "env": env}, 30)
        if "pid" not in answer:
            raise OSError(answer.get("error", "the fork server started no worker"))
        return ForkedProcess(int(answer["pid"]))

    async def run(self, argv: list[str], env: dict[str, str], within: float) -> tuple[int, str]:
        """Run ``postwarden.cli argv`` in a forked child to its end: (exit code, output)."""
        answer = await self._ask({"run": argv, "env": env}, within)
        return int(answer["code"]), str(answer.get("out", ""))

    async def stop(self) -> None:
        """Close the request pipe (the server exits) and wait for it."""
        if self._out >= 0:
            with contextlib.suppress(OSError):
                os.close(self._out)
            self._out = -1
        if self.proc is not None and self.proc.returncode is None:
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _say(fd: int, message: dict[str, Any]) -> None:
    """One line of the protocol (a pid or an error is under PIPE_BUF: one write)."""
    _write_all(fd, (json.dumps(message) + "\n").encode())


# ------------------------------------------------------------------ the server


def _set_title(argv: list[str]) -> None:
    """The worker's command line as ``exec`` would have shown it (``ps``, ``pgrep``)."""
    try:
        from setproctitle import setproctitle
    except ImportError:  # pragma: no cover - a declared dependency
        return
    setproctitle(" ".join([sys.executable, "-m", "postwarden.cli", *argv]))


Main = Callable[[list[str]], int]


def _child_main(request: dict[str, Any], supervisor: int, closing: list[int], main: Main) -> int:
    """In the forked child: become the worker (or the command) the request names."""
    for fd in closing:
        with contextlib.suppress(OSError):
            os.close(fd)
    os.environ.clear()
    os.environ.update(request.get("env", {}))
    argv = list(request.get("argv") or request.get("run") or [])
    if "argv" in request:
        # Wait to be adopted by the supervisor (the intermediate child exits at once):
        # the worker then checks its parent and asks to die with it, as one started by
        # exec does.
        deadline = time.monotonic() + ADOPTION_TIMEOUT
        while os.getppid() != supervisor:
            if time.monotonic() > deadline:
                return 1
            time.sleep(0.001)
        _set_title(argv)
    # The signal dispositions of a new interpreter.
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.argv = [sys.executable, *argv]
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)


def _run_child(request: dict[str, Any], supervisor: int, closing: list[int], main: Main) -> None:
    code = 1
    try:
        code = _child_main(request, supervisor, closing, main)
    except BaseException:  # the child must end here, whatever happened
        traceback.print_exc()
    finally:
        # What an interpreter's exit would still do here (the worker has shut down
        # its loop, spool and threads in order): flush the logs and the streams.
        with contextlib.suppress(Exception):
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _start_worker(
    request: dict[str, Any], supervisor: int, closing: list[int], ans: int, main: Main
) -> None:
    """Fork twice: the worker's parent exits at once, and the worker is adopted by
    the supervisor. Its pid goes to the supervisor from the intermediate child (one
    write under PIPE_BUF: whole).

    The kernel gives an orphan to the subreaper's first live thread, its main thread,
    and sends the worker its death signal when *that thread* exits: the supervisor's
    main thread lives as long as it does."""
    middle = os.fork()
    if middle == 0:
        try:
            pid = os.fork()
            if pid == 0:
                _run_child(request, supervisor, closing, main)
            _say(ans, {"pid": pid})
        except BaseException as exc:
            with contextlib.suppress(OSError):
                _say(ans, {"error": repr(exc)})
        finally:
            os._exit(0)
    os.waitpid(middle, 0)


def _run_command(
    request: dict[str, Any], supervisor: int, closing: list[int], main: Main
) -> dict[str, Any]:
    """Fork a child that runs the command with its output into a pipe: its exit code
    and output."""
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(out_r)
        os.dup2(out_w, 1)
        os.dup2(out_w, 2)
        os.close(out_w)
        _run_child(request, supervisor, closing, main)
    os.close(out_w)
    chunks = []
    with os.fdopen(out_r, "rb") as f:
        while chunk := f.read(65536):
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    return {
        "code": os.waitstatus_to_exitcode(status),
        "out": b"".join(chunks).decode(errors="replace"),
    }


def _fork_safe() -> str:
    """Why forking now would be unsafe ("" when it is safe)."""
    import threading

    if threading.active_count() != 1:  # a fork would copy a lock another thread holds
        return f"{threading.active_count()} threads after the imports"
    return ""


def serve(
    req: int,
    ans: int,
    supervisor: int,
    preload: tuple[Callable[[], None], Callable[[], None]],
    main: Main,
) -> int:
    """The server's loop (``postwarden forkserver``, which the supervisor starts):
    one request at a time until the request pipe closes; a child runs ``main`` (the
    CLI's) with the request's argv. ``preload`` is two steps: what the ``db`` check
    before the workers needs, at once; what a worker needs, before the first worker
    (a start refused by the database check never pays for it)."""
    from postwarden.supervisor import die_with_parent

    die_with_parent(supervisor)
    # The supervisor says when to stop (it closes the pipe): not a terminal's ^C or
    # hang-up sent to the whole process group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    early, rest = preload
    try:
        early()
    except Exception as exc:  # said to the supervisor, which execs instead
        _say(ans, {"ready": False, "why": repr(exc)})
        return 1
    if why := _fork_safe():
        _say(ans, {"ready": False, "why": why})
        return 1
    # setproctitle takes over the memory of argv and the environment at its first
    # call: made here, while the environment is this process's own (a worker changes
    # it), so that a worker's title is not cut to the length of this command line.
    with contextlib.suppress(ImportError):
        import setproctitle

        setproctitle.setproctitle(setproctitle.getproctitle())
    _say(ans, {"ready": True})
    closing = [req, ans]
    loaded = False
    with os.fdopen(req, "rb", closefd=False) as requests:
        for line in requests:
            request = json.loads(line)
            if "argv" in request:
                if not loaded:
                    loaded = True
                    try:
                        rest()
                    except Exception as exc:
                        why = repr(exc)
                    else:
                        why = _fork_safe()
                    if why:  # the supervisor execs this worker, and the next ones
                        _say(ans, {"error": why})
                        return 1
                _start_worker(request, supervisor, closing, ans, main)
            else:
                answer = _run_command(request, supervisor, closing, main)
                _say(ans, answer)
    return 0
