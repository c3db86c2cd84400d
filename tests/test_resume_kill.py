"""SIGKILL a training subprocess at random moments, resume each time, and get the same model.

The run (``_kill_target.py``: 2-D data, 3 blocks of 60 steps, a checkpoint every 8 steps, the
newest 2 kept, EMA, cosine schedule with warm-up) is killed at seeded random points: right after
a progress report, in the middle of the pushforward, half-way through writing a checkpoint or
pool file, or after a random delay. Each time it is resumed from the newest good checkpoint; the
finished model must be **bit-identical** to an uninterrupted run with the same seed (CPU, one
thread).
"""

from __future__ import annotations

import json
import random
import shutil

import _kill_target as target
import _robustness_cases as cases
import pytest
import torch

import localfm
from localfm.runstate import _checkpoints

KILL_SEED = 20241003
N_KILLS = 5


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    reference = cases.reference_tensors()
    run_dir = tmp_path / "run"
    outcomes = []
    # A push kill and a write kill first, so both always land (later random kills may find the run
    # finished), then seeded random kill points.
    plan = [("push", 2), ("write", 1)] + cases.kill_plan(random.Random(KILL_SEED), N_KILLS - 2)
    for kind, arg in plan:
        outcome = cases.run_target(run_dir, kind, arg)
        outcomes.append(outcome)
        assert cases.check_run_dir(run_dir) == [], outcome
        if outcome.kind == "write" and outcome.killed:  # the kill left a half-written temporary file
            assert cases.partial_writes(run_dir) > 0, outcome
    writes_cut = [o for o in outcomes if o.kind == "write" and o.killed]
    assert sum(o.killed for o in outcomes) >= N_KILLS - 2, outcomes  # a late kill may find the run finished
    assert writes_cut, "no kill landed inside a checkpoint write"
    assert any(o.kind == "push" and o.killed for o in outcomes), outcomes

    final = cases.run_target(run_dir, None, 0)
    assert final.last_line == "done"
    assert cases.partial_writes(run_dir) == 0, "the resumed run left temporary files behind"
    identical, diff = cases.compare(reference, cases.final_tensors(run_dir))
    assert identical, f"resumed run differs from the uninterrupted one by up to {diff:g}"


def test_sigkill_while_a_pool_file_is_written(tmp_path):
    """Pools on disk: a kill inside the pushforward leaves the next pool's file half-written under
    its temporary name; the resumed run removes it, writes the pool again and ends bit-identical."""
    run_dir = tmp_path / "run"
    first = cases.run_target(run_dir, "push", 3, pools="disk")  # half-way through block 1's push
    assert first.killed and cases.check_run_dir(run_dir) == []
    assert [p.name for p in (run_dir / "checkpoints").glob(".pool-b01.*.npy.tmp")], "no half-written pool file"
    second = cases.run_target(run_dir, "push", 9, pools="disk")  # inside the next push (pool 2) this time
    assert second.killed and cases.check_run_dir(run_dir) == []
    final = cases.run_target(run_dir, None, 0, pools="disk")
    assert final.last_line == "done" and cases.partial_writes(run_dir) == 0
    assert {p.suffix for p in (run_dir / "checkpoints").glob("pool-b*")} == {".npy"}
    identical, diff = cases.compare(cases.reference_tensors(), cases.final_tensors(run_dir))
    assert identical, f"resumed run differs from the uninterrupted one by up to {diff:g}"


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("where", ["mid_block", "boundary"])
def test_resume_from_each_kind_of_checkpoint(tmp_path, where, one_thread):
    """Resuming inside a block (network, Adam, EMA and generator restored) or at a block boundary."""
    run_dir = tmp_path / "run"
    localfm.fit(target.data(), target.CONFIG, run_dir=run_dir)
    ckpts = _checkpoints(run_dir / "checkpoints")
    keep = [d for d in ckpts if d.name.endswith("-s0000000") == (where == "boundary")][-1]
    for d in ckpts:
        if d != keep:
            shutil.rmtree(d)
    resumed = localfm.fit(target.data(), target.CONFIG, run_dir=run_dir, resume=True)
    identical, diff = cases.compare(cases.reference_tensors(), resumed.state_dict())
    assert identical, f"differs by up to {diff:g}"


def test_log_drops_the_partial_line_a_kill_left(tmp_path):
    from localfm.runs import open_log

    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')  # killed in the middle of a write
    with open_log(path) as f:
        f.write('{"step": 3}\n')
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    with open_log(path) as f:  # a whole file is left as it is
        f.write('{"step": 4}\n')
    assert path.read_text().count("\n") == 4
