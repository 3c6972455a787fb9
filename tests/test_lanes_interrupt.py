"""A Ctrl-C while lanes run side by side: the lanes are stopped and joined before the interrupt goes on (issue 13).

Before, the lanes' daemon threads were left inside torch while the interpreter finalised, and the process ended in a
C++ abort ("terminate called without an active exception", status 134) instead of the command's 130.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

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


@pytest.mark.parametrize("delay", [0.0, 0.1, 0.2, 0.3, 0.5])
def test_ctrl_c_stops_and_joins_the_lanes_before_the_process_ends(delay):
    """SIGINT once both lanes run (after ``delay`` s, to meet them at different steps): status 130, both lanes'
    ``finally`` ran before the caller's handler, no C++ abort. Before the fix every run here ended with -6."""
    import time

    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"started\n"
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    text = err.decode()
    assert "terminate called" not in text, text
    assert proc.returncode == 130, text
    lines = text.splitlines()
    assert sorted(lines[:2]) == ["lane 0 stopped", "lane 1 stopped"] and lines[2] == "interrupted", text
