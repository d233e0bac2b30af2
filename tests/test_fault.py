"""Training survives SIGKILL at random moments and inside checkpoint writes (tests/fault_harness.py):
no kill leaves a checkpoint that fails to load, and the final weights equal an unbroken run bit
for bit. A bounded run here; `make fault` runs the harness longer."""
from __future__ import annotations

import fault_harness


def test_killed_and_restarted_training_equals_an_unbroken_run(tmp_path):
    steps = 10
    wall = fault_harness.unbroken(tmp_path / "unbroken", steps)
    (tmp_path / "killed").mkdir()
    stats = fault_harness.run_with_kills(tmp_path / "killed", tmp_path / "unbroken", steps, kills=4, seed=0,
                                         max_delay=wall)
    assert stats["in_write"] >= 1, stats   # at least one kill inside a checkpoint write
