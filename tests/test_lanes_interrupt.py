"""A Ctrl-C while lanes run side by side: the lanes are stopped and joined before the interrupt goes on (issue 13).

Before, the lanes' daemon threads were left inside torch while the interpreter finalised, and the process ended in a
C++ abort ("terminate called without an active exception", status 134) instead of the command's 130.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

#: Two lanes of float64 products and eigenvalues without end; each says when its ``finally`` ran (in its thread),
#: the caller catches the KeyboardInterrupt as ``fisherlab`` does (cli.run_command: status 130) and says so after.
SCRIPT = textwrap.dedent("""
    import signal, sys, threading
    import torch
    from fisherlab.linalg.threads import side_by_side

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where the test runner ignores SIGINT
    torch.set_num_threads(2)
    started = [threading.Event(), threading.Event()]

    def lane(k):
        a = torch.randn(300, 300, dtype=torch.float64)
        try:
            while True:
                started[k].set()
                a = torch.linalg.eigvalsh(a @ a.T).diag() / 1e3 + torch.randn(300, 300, dtype=torch.float64)
        finally:
            sys.stderr.write(f"lane {k} stopped\\n")  # one write: the lanes' lines do not mix

    def say_started():
        for event in started:
            event.wait()
        print("started", flush=True)

    def main():
        threading.Thread(target=say_started, daemon=True).start()
        try:
            side_by_side([lambda: lane(0), lambda: lane(1)], torch.device("cpu"))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            return 130
        return 0

    sys.exit(main())
""")


def ctrl_c(proc: subprocess.Popen, delay: float, timeout: float = 60.0, *, group: bool = True) -> tuple[str, str]:
    """Ctrl-C ``delay`` s from now: SIGINT to ``proc``'s process group (as a terminal sends it to the command and
    the processes it started; to ``proc`` alone when it has no group of its own or ``group`` is False), then its
    stdout and stderr once it ended, waited for at most ``timeout`` s (then ``proc``, and its group, are killed and
    the test fails); "" for a stream that is not a pipe."""
    time.sleep(delay)
    try:
        own = os.getpgid(proc.pid) != os.getpgrp()
    except ProcessLookupError:  # it has ended and been waited for
        own = False
    group = group and own
    try:
        if group:
            try:
                os.killpg(proc.pid, signal.SIGINT)
            except ProcessLookupError:  # the group has ended
                pass
        else:
            proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{proc.args} still ran {timeout} s after the Ctrl-C")
    finally:
        if proc.poll() is None:
            if own:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
            proc.communicate()
    return (out or b"").decode(errors="replace"), (err or b"").decode(errors="replace")


def assert_no_abort(proc: subprocess.Popen, err: str, statuses: tuple[int, ...] = (130,)) -> None:
    """``proc`` ended with one of ``statuses`` and no C++ abort (``terminate called ...``, status 134 or -6)."""
    assert "terminate called" not in err, err
    assert proc.returncode in statuses, f"exit status {proc.returncode}\n{err}"


@pytest.mark.parametrize("delay", [0.0, 0.1, 0.2, 0.3, 0.5])
def test_ctrl_c_stops_and_joins_the_lanes_before_the_process_ends(delay):
    """SIGINT once both lanes run (after ``delay`` s, to meet them at different steps): status 130, both lanes'
    ``finally`` ran before the caller's handler, no C++ abort. Before the fix every run here ended with -6."""
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"started\n"
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    _, text = ctrl_c(proc, delay)
    assert_no_abort(proc, text)
    lines = text.splitlines()
    assert sorted(lines[:2]) == ["lane 0 stopped", "lane 1 stopped"] and lines[2] == "interrupted", text
