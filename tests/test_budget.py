"""`train.max_minutes`: a run planned for far longer stops within its budget (plus the final
evaluation), with the learning-rate schedule stretched so it still ends at its final value."""

import time

import pytest


def _trainer(tmp_path, minutes, schedule="linear", steps=100000):
    from gpt2tune.model.build import build_scratch
    from gpt2tune.model.tokenizer import Framing
    from gpt2tune.recipe import TrainSection
    from gpt2tune.train.loop import Data, Trainer

    model = build_scratch("nano", 30, Framing(1, 2, 0, True), n_positions=24)
    seqs = [[1] + [3 + (i * 7 + j) % 25 for j in range(4 + i % 11)] + [2] for i in range(200)]
    cfg = TrainSection(precision="fp32", max_steps=steps, batch_size=8, lr=1e-3, schedule=schedule, warmup_steps=5,
                       max_minutes=minutes, num_threads=1, log_every=1, eval_every=0)
    return Trainer(model, Data(seqs, seqs[:16], 0), cfg, tmp_path, progress=False, log=lambda m: None)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_time_budget_plans_fewer_steps_and_the_schedule_still_ends(tmp_path, monkeypatch, schedule):
    """With a steady clock (every reading 5 ms later than the one before) the plan is exact: the run
    does the steps it planned and its learning rate ends at the schedule's end value."""
    from gpt2tune.train import loop

    now = [0.0]

    def clock():
        now[0] += 0.005
        return now[0]

    monkeypatch.setattr(loop.time, "perf_counter", clock)
    t = _trainer(tmp_path, 0.1, schedule)
    res = t.fit()
    assert 20 < res.steps < 100000 and t.total_steps == res.steps  # planned to fit, and did all it planned
    lrs = [r["lr"] for r in res.records if r["split"] == "train"]
    assert lrs[-1] == pytest.approx(0.0, abs=1e-9)  # the schedule's end value: it was stretched, not cut
    assert max(lrs) == pytest.approx(1e-3)


def test_time_budget_holds_in_real_time(tmp_path):
    t = _trainer(tmp_path, 0.1)
    t0 = time.perf_counter()
    res = t.fit()
    assert res.steps < 100000 and time.perf_counter() - t0 < 6 + 5  # the budget (6 s) + final evaluation and slack


def test_budget_that_fits_changes_nothing(tmp_path):
    t = _trainer(tmp_path, 10.0, steps=30)
    res = t.fit()
    assert res.steps == 30 == t.total_steps
