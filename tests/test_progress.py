"""Progress reports: a tqdm bar on a terminal, plain lines in a file or a pipe (relayops._optional)."""
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from relayops import _optional
from relayops._optional import progress_bar

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    """A stand-in for time.monotonic that moves only when told."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(_optional.time, "monotonic", c)
    return c


def test_lines_in_a_file_every_interval_and_at_the_end(clock):
    out = io.StringIO()
    with progress_bar(True, total=10, desc="train base", file=out, position=1, dynamic_ncols=True) as bar:
        bar.update(3)                              # before the interval: nothing written
        assert out.getvalue() == ""
        clock.now += _optional.LINE_INTERVAL_S
        bar.set_postfix(loss="0.5000")
        bar.update(2)                              # 5 steps in 30 s
        clock.now += 10
        bar.update(5)
    assert out.getvalue() == ("train base: 5/10 (50%), 30 s, 0.17/s, loss=0.5000\n"
                              "train base: 10/10 (100%), 40 s, 0.25/s, loss=0.5000\n")


def test_lines_without_a_total_and_transient_bars(clock):
    out = io.StringIO()
    bar = progress_bar(True, total=None, initial=40, desc="train relay", file=out)
    clock.now += 2 * _optional.LINE_INTERVAL_S
    bar.update(6)                                  # counted from the initial step: 6 steps in 60 s
    bar.close()
    bar.close()                                    # a second close writes nothing more
    assert out.getvalue() == "train relay: 46, 60 s, 0.10/s\ntrain relay: 46, 60 s, 0.10/s\n"
    out = io.StringIO()
    with progress_bar(True, total=4, desc="relay", leave=False, file=out) as bar:   # a sampler's inner loop
        bar.update(4)
    assert out.getvalue() == ""                    # vanishes, as from a terminal


def test_a_terminal_gets_a_tqdm_bar_and_progress_off_gets_nothing():
    tqdm = pytest.importorskip("tqdm")
    main, secondary = os.openpty()
    with os.fdopen(secondary, "w") as tty:
        bar = progress_bar(True, total=3, desc="x", file=tty)
        assert isinstance(bar, tqdm.tqdm)
        bar.close()
    os.close(main)
    assert type(progress_bar(False, total=3)).__name__ == "_NoBar"


_TWO_BARS = """
import sys, time
from relayops import _optional
_optional.LINE_INTERVAL_S = 0.0
with _optional.progress_bar(True, total=200, desc=sys.argv[1]) as bar:
    for _ in range(200):
        bar.update(1)
"""


def test_two_processes_share_a_log_file_in_whole_lines(tmp_path):
    """The demo trains its two stages side by side in two processes writing progress to the same
    stderr: in a log file every report is a line of its own."""
    log = tmp_path / "log.txt"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log, "a") as f:
        procs = [subprocess.Popen([sys.executable, "-c", _TWO_BARS, name], stderr=f, env=env)
                 for name in ("base", "relay")]
        assert all(p.wait(timeout=120) == 0 for p in procs)
    text = log.read_text()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 2 * 201                   # one line per update, one at the end, per process
    pattern = re.compile(r"(base|relay): \d+/200 \(\d+%\), \d+ s(, [0-9.]+/s)?")
    assert all(pattern.fullmatch(line) for line in lines), [line for line in lines if not pattern.fullmatch(line)][:3]
    for name in ("base", "relay"):
        assert f"{name}: 200/200 (100%)" in text
