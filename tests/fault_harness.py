"""Fault injection for training: SIGKILL ``relayops train`` at random moments, and inside a
checkpoint write, restart it, and check that the result equals an unbroken run bit for bit.

Each start (seeded) is killed either at a random moment (a uniform delay after the start, up to
the time of the unbroken run) or, every third start, inside a checkpoint write: the child runs
with ``RELAYOPS_TEST_PAUSE_IN_WRITE``, which makes the writer stop half-way through its temporary
file and create a marker; the harness kills it as soon as the marker appears. After every kill
the run directory must hold either no checkpoint (killed before the first save) or one that
loads, at a step no earlier than before. A run that reaches its last step must equal the
unbroken run in every tensor (model, EMA, optimizer, generator states), bit for bit; the next
kills then hit a fresh run.

    python tests/fault_harness.py --kills 20 --seed 1     # the longer run of `make fault`
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from relayops.training import checkpoint as ckpt  # noqa: E402

TRAIN_ARGS = ["--stage", "relay", "--batch-size", "8", "--resolution", "16", "--channels", "16",
              "--channel-mult", "1,2", "--save-every", "2", "--device", "cpu", "--seed", "3"]


def _env(pause_marker: Path | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop(ckpt.PAUSE_ENV, None)
    if pause_marker is not None:
        env[ckpt.PAUSE_ENV] = str(pause_marker)
    return env


def _start(out: Path, steps: int, pause_marker: Path | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "relayops", "train", "--out", str(out), "--steps", str(steps), *TRAIN_ARGS]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(pause_marker), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> None:
    _, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"relayops train failed ({proc.returncode}): {err.decode()[-2000:]}")


def _checked_step(out: Path) -> int:
    """The step of the checkpoint in ``out`` (-1 when there is none); it must load."""
    if not (out / ckpt.WEIGHTS_NAME).exists():
        return -1
    tensors, record = ckpt.load_checkpoint(out)   # raises for a broken checkpoint
    assert record["step"] >= 0 and tensors
    return int(record["step"])


def _kill(proc: subprocess.Popen) -> bool:
    """SIGKILL; False when the process had already exited."""
    if proc.poll() is not None:
        proc.communicate()
        return False
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    return True


def unbroken(out: Path, steps: int) -> float:
    """Train without kills; returns the wall time (the scale of the random kill moments)."""
    t0 = time.monotonic()
    _finish(_start(out, steps))
    return time.monotonic() - t0


def run_with_kills(work: Path, unbroken_dir: Path, steps: int, kills: int, seed: int, max_delay: float,
                   log=lambda *a: None) -> dict:
    """Train ``steps`` steps in a directory under ``work``, SIGKILLed ``kills`` times (random
    moments uniform in ``[0, max_delay]`` seconds after the start). A run that reaches its last
    step is compared with ``unbroken_dir`` and the next kills hit a fresh run (a new cycle); the
    last cycle is finished without a kill and compared too. Returns counts."""
    rng = random.Random(seed)
    stats = {"kills": 0, "in_write": 0, "random": 0, "exited_first": 0, "cycles": 0}
    out, last, attempt = work / "cycle0", -1, 0
    while stats["kills"] < kills:
        if attempt >= 4 * kills + 8:
            raise AssertionError(f"only {stats['kills']} of {kills} kills landed in {attempt} attempts")
        in_write = attempt % 3 == 1   # the first kill may leave a checkpoint for this one to overwrite
        attempt += 1
        marker = work / "paused"
        marker.unlink(missing_ok=True)
        proc = _start(out, steps, marker if in_write else None)
        if in_write:
            deadline = time.monotonic() + 300
            while not marker.exists():
                if proc.poll() is not None:   # finished without a write to stop in
                    break
                if time.monotonic() > deadline:
                    _kill(proc)
                    raise AssertionError("the checkpoint writer never reached the pause hook")
                time.sleep(0.02)
        else:
            try:
                proc.wait(timeout=rng.uniform(0.0, max_delay))
            except subprocess.TimeoutExpired:
                pass
        killed = _kill(proc)
        if not killed and proc.returncode != 0:
            raise AssertionError(f"relayops train failed ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        marker.unlink(missing_ok=True)
        step = _checked_step(out)
        assert step >= last, f"attempt {attempt}: the checkpoint went back from step {last} to {step}"
        last = step
        if killed:
            stats["kills"] += 1
            stats["in_write" if in_write else "random"] += 1
        else:
            stats["exited_first"] += 1
        log(f"attempt {attempt}: {'inside a checkpoint write' if in_write else 'at a random moment'}, "
            f"{'killed' if killed else 'had finished'}; checkpoint at step {step}")
        if step == steps:   # this run is complete: check it, and kill a fresh one next
            assert_same_checkpoints(unbroken_dir, out)
            stats["cycles"] += 1
            out, last = work / f"cycle{stats['cycles']}", -1
    _finish(_start(out, steps))
    assert_same_checkpoints(unbroken_dir, out)
    stats["cycles"] += 1
    for d in work.iterdir():
        leftovers = [p.name for p in d.iterdir() if p.name.endswith(".tmp")] if d.is_dir() else []
        assert not leftovers, f"temporary files left behind in {d.name}: {leftovers}"
    return stats


def assert_same_checkpoints(a: Path, b: Path) -> None:
    ta, ra = ckpt.load_checkpoint(a)
    tb, rb = ckpt.load_checkpoint(b)
    assert ra["step"] == rb["step"], (ra["step"], rb["step"])
    assert ta.keys() == tb.keys(), sorted(set(ta) ^ set(tb))
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), f"tensor {k} differs"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-delay", type=float, default=None,
                   help="random kill moments in [0, this] seconds (default: the unbroken run's time)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.monotonic()
        wall = unbroken(tmp / "unbroken", args.steps)
        (tmp / "killed").mkdir()
        stats = run_with_kills(tmp / "killed", tmp / "unbroken", args.steps, args.kills, args.seed,
                               args.max_delay or wall, log=print)
    print(f"{stats['kills']} kills ({stats['in_write']} inside a checkpoint write), 0 failures: every checkpoint "
          f"left by a kill loaded, and the final weights of all {stats['cycles']} runs equal the unbroken run bit "
          f"for bit ({stats['exited_first']} restarts finished before their kill; {time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
