"""Bounded soak (tests/soak.py; `make soak` runs 10,000 calls of every op) and thread safety: the
ops called from several Python threads at once give the serial results, bit for bit."""
from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import soak
from test_backends import CASES, TARGETS, _target_id, make_inputs


def test_bounded_soak_memory_does_not_grow():
    r = soak.soak(calls_per_op=300, seed=1, targets=[t for t in TARGETS if t[0] != "triton"])
    assert sum(r["counts"].values()) == 300 * len(soak.OPS)
    assert r["end"] - r["after_warmup"] < 16 * 2**20, r


THREAD_SHAPES = [(2, 3, 8, 12, 4), (1, 2, 6, 6, 3), (3, 1, 16, 8, 8)]


@pytest.mark.parametrize("target", TARGETS, ids=_target_id)
def test_threads_give_the_serial_results(target):
    backend, device = target
    shapes = THREAD_SHAPES
    if target == ("triton", "cpu"):
        # The interpreter runs one launch at a time (relayops.triton.ops holds a lock around it),
        # so threads interleave only between launches, in the Python around them, which is the
        # same for every s: the s = 4 (vector) and s = 3 (element-by-element) shapes show it,
        # s = 8 adds a minute of interpretation and no new interleaving. On a GPU it runs too.
        shapes = THREAD_SHAPES[:2]
    jobs = []
    for i, shape in enumerate(shapes):
        inputs, _ = make_inputs(shape, torch.float32, device, seed=20 + i)
        jobs += [(name, inputs, shape[4]) for name in CASES]
    serial = [CASES[name][0](inputs, s, backend) for name, inputs, s in jobs]
    order = list(range(len(jobs))) * 2
    random.Random(0).shuffle(order)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda i: (i, CASES[jobs[i][0]][0](jobs[i][1], jobs[i][2], backend)), order))
    for i, out in results:
        assert torch.equal(out, serial[i]), f"{jobs[i][0]} on {backend}: a threaded call differs from the serial one"
