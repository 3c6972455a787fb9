"""Child processes forked from one server process that imported torch and fisherlab once.

A fresh interpreter that imports torch and fisherlab costs 5-7 CPU s (and torch.func's first call 3 s more, for
``torch._dynamo``); tests that need many real processes (``kill -9`` while saving, racing claimers, a lock holder,
data-parallel ranks) fork them from a :class:`Spawner` instead. Each child is a process of its own (its own pid,
file locks, signals and sockets), runs its code as ``python -c CODE ARGS`` would, with its own stdin, stdout and
stderr pipes to the test, and ends through the interpreter's own exit (atexit handlers, h5py's cleanup), not
``os._exit``.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

#: The server: imports the modules named in argv[3] (comma-separated) and moves what they made out of the garbage
#: collector's reach (``gc.freeze``: a child's exit then costs ~0.7 CPU s instead of ~2.2, its collection no longer
#: visiting, and copying, every page of the inherited heap), then forks one child per request (its stdin, stdout
#: and stderr the pipes sent with the request, its environment updated with the request's), reports each child's
#: pid and exit code, and on EOF kills the children still running and exits.
SERVER = """
    import gc, json, os, select, signal, socket, sys, traceback
    sys.path.insert(0, sys.argv[2])
    for name in filter(None, sys.argv[3].split(",")):
        __import__(name)
    gc.freeze()
    conn, children = socket.socket(fileno=int(sys.argv[1])), set()
    while True:
        readable = select.select([conn], [], [], 0.02)[0]
        while children and (ended := os.waitpid(-1, os.WNOHANG))[0]:
            children.discard(ended[0])
            conn.send(json.dumps({"pid": ended[0], "rc": os.waitstatus_to_exitcode(ended[1])}).encode())
        if not readable:
            continue
        msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        if not msg:  # the test closed its end
            for pid in children:
                os.kill(pid, signal.SIGKILL)
            break
        request = json.loads(msg)
        if (pid := os.fork()) == 0:
            conn.close()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            os.environ.update(request["env"])
            sys.argv = ["-c", *request["argv"]]
            try:
                exec(compile(request["code"], "<child>", "exec"), {"__name__": "__main__"})
            except SystemExit:
                raise
            except BaseException:
                traceback.print_exc()
                sys.exit(1)
            sys.exit(0)
        for fd in fds:
            os.close(fd)
        children.add(pid)
        conn.send(json.dumps({"started": pid}).encode())
"""


#: What the tests' shared spawner (the ``spawner`` fixture of tests/conftest.py) imports before forking: what its
#: children use (``fisherlab fidelity`` and the report, data-parallel engines, saving and loading results) and what
#: their first calls import (torch._dynamo, by torch.func; h5netcdf and dask, by saving a Dataset).
PRELOADED = ["pytest", "torch._dynamo", "h5netcdf", "dask.array", "fisherlab.cli", "fisherlab.study",
             "fisherlab.distributed", "fisherlab.engine", "fisherlab.fidelity", "fisherlab.linalg", "fisherlab.ngd",
             "fisherlab.structures.lowrank", "fisherlab.results", "fisherlab.results.io", "fisherlab.results.lock",
             "fisherlab.report"]


class Child:
    """A child of a :class:`Spawner`, used like a :class:`subprocess.Popen` (stdin text, stdout and stderr bytes,
    unbuffered, so that a ``readline`` takes no more than its line from what :meth:`communicate` reads)."""

    def __init__(self, spawner: Spawner, pid: int, stdin: int, stdout: int, stderr: int) -> None:
        self.spawner, self.pid, self.returncode = spawner, pid, None
        self.stdin = open(stdin, "w")  # noqa: SIM115 - closed by communicate
        self.stdout, self.stderr = open(stdout, "rb", buffering=0), open(stderr, "rb", buffering=0)  # noqa: SIM115

    def poll(self) -> int | None:
        self.spawner.collect(0.0)
        self.returncode = self.spawner.exits.get(self.pid)
        return self.returncode

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"child {self.pid}", timeout)
            self.spawner.collect(0.05)
        return self.returncode

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def communicate(self, timeout: float = 60.0) -> tuple[str, str]:
        """Close stdin, wait (bounded) for the end, and return (stdout, stderr)."""
        with contextlib.suppress(OSError):
            self.stdin.close()
        deadline, chunks = time.monotonic() + timeout, {self.stdout: [], self.stderr: []}
        open_ = list(chunks)
        while open_:
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(f"child {self.pid}", timeout)
            for f in select.select(open_, [], [], left)[0]:
                data = os.read(f.fileno(), 1 << 16)
                if data:
                    chunks[f].append(data)
                else:
                    open_.remove(f)
        self.wait(max(deadline - time.monotonic(), 1.0))
        out, err = (b"".join(chunks[f]).decode(errors="replace") for f in (self.stdout, self.stderr))
        for f in chunks:
            f.close()
        return out, err


class Spawner:
    """The server process (importing ``modules``, with ``tests/`` on its path and environment ``env``) and the
    children forked from it."""

    def __init__(self, modules: list[str], env: dict[str, str] | None = None) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.server = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SERVER), str(theirs.fileno()),
                                        str(Path(__file__).parent), ",".join(modules)], pass_fds=[theirs.fileno()],
                                       stdin=subprocess.DEVNULL, env=env)
        theirs.close()
        self.exits: dict[int, int] = {}
        self.started: list[int] = []

    def collect(self, timeout: float) -> None:
        """Read the server's reports for up to ``timeout`` seconds (0: those already sent)."""
        while select.select([self.sock], [], [], timeout)[0]:
            msg = self.sock.recv(1 << 16)
            assert msg, f"the spawner ended (rc {self.server.poll()})"
            report = json.loads(msg)
            if "started" in report:
                self.started.append(report["started"])
            else:
                self.exits[report["pid"]] = report["rc"]
            timeout = 0.0

    def spawn(self, code: str, *args: str, env: dict[str, str] | None = None) -> Child:
        """A child running ``python -c code args`` (dedented), its environment updated with ``env``."""
        stdin, stdout, stderr = os.pipe(), os.pipe(), os.pipe()
        theirs = [stdin[0], stdout[1], stderr[1]]
        request = {"code": textwrap.dedent(code), "argv": args, "env": env or {}}
        socket.send_fds(self.sock, [json.dumps(request).encode()], theirs)
        for fd in theirs:
            os.close(fd)
        deadline = time.monotonic() + 120
        while not self.started:
            assert time.monotonic() < deadline, "the spawner did not fork"
            self.collect(0.1)
        return Child(self, self.started.pop(0), stdin[1], stdout[0], stderr[0])

    def close(self) -> None:
        """End the server (it kills the children still running) and wait (bounded) for it."""
        self.sock.close()
        try:
            self.server.wait(30)
        finally:
            if self.server.poll() is None:
                self.server.kill()
                self.server.wait()
