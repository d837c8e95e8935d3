"""Gradient accumulation is a bigger batch: k micro-batches of b rows update the weights as one
batch of k*b rows, whatever the rows' lengths and loss masks (each target weighs the same)."""

import random

import pytest
import torch

from gpt2tune.data.dataset import IGNORE, collate


def _rows(n=64, seed=0):
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 40) for _ in range(rng.choice([3, 5, 9, 14]))] + [2] for _ in range(n)]


def _chat_collate(rows):
    """Like a chat sample: only the answer (here the last third of each row) is trained on."""
    b = collate(rows, 0)
    for i, r in enumerate(rows):
        b["labels"][i, : max(1, 2 * len(r) // 3)] = IGNORE
    return b


def _train(tmp_path, batch_size, grad_accum, collate_fn, fast=False):
    from gpt2tune.model.build import build_scratch
    from gpt2tune.model.tokenizer import Framing
    from gpt2tune.recipe import TrainSection
    from gpt2tune.train.loop import Data, Trainer

    torch.manual_seed(0)
    model = build_scratch("nano", 40, Framing(1, 2, 0, True), n_positions=32)
    model.config.attn_pdrop = model.config.embd_pdrop = model.config.resid_pdrop = 0.0  # what train.fast reads
    for m in model.modules():  # no dropout: the comparison is exact arithmetic up to summation order
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    rows = _rows()
    cfg = TrainSection(precision="fp32", max_steps=4, batch_size=batch_size, grad_accum=grad_accum, lr=1e-2,
                       num_threads=1, fast=fast, seed=5)
    data = Data(rows, rows[:4], 0, batching="pad", collate=collate_fn)
    tmp_path.mkdir(parents=True)
    Trainer(model, data, cfg, tmp_path, progress=False, log=lambda m: None).fit()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["causal-lm", "chat", "causal-lm fast"])
def test_k_micro_batches_equal_one_batch_of_all_rows(tmp_path, kind):
    fn = _chat_collate if kind == "chat" else (lambda rows: collate(rows, 0))
    fast = kind.endswith("fast")
    one = _train(tmp_path / "one", 8, 1, fn, fast)
    acc = _train(tmp_path / "acc", 2, 4, fn, fast)
    # equal up to summation order (Adam turns rounding in near-zero gradients into ~1e-4 after 4 steps);
    # weighting each micro-batch's mean loss alike, as before, moved weights by ~5e-2
    worst = max(float((one[k] - acc[k]).abs().max()) for k in one)
    assert worst < 5e-4, worst


def test_validation_subset_is_a_fixed_random_sample_not_the_shortest(tmp_path):
    """train.eval_batches: a seeded random subset (the same at every evaluation), not the first
    batches of the length-sorted set, which hold only the shortest samples."""
    from gpt2tune.model.build import build_scratch
    from gpt2tune.model.tokenizer import Framing
    from gpt2tune.recipe import TrainSection
    from gpt2tune.train.loop import Data, Trainer

    val = [[1] + [5] * n + [2] for n in range(1, 101)]  # lengths 3..102, one of each
    logs = []
    cfg = TrainSection(precision="fp32", max_steps=1, batch_size=8, eval_batches=2)
    t = Trainer(build_scratch("nano", 10, Framing(1, 2, 0, True), n_positions=128), Data(val, val, 0), cfg, tmp_path,
                progress=False, log=logs.append)
    first = t._val_batches()
    lengths = sorted(int(n) for b in first for n in b["attention_mask"].sum(1))
    assert len(lengths) == 16
    assert max(lengths) > 40 and sum(lengths) / 16 > 25  # spread over the set; the shortest 16 average 10.5
    assert t._val_batches() is first or all(torch.equal(a["input_ids"], b["input_ids"])
                                            for a, b in zip(first, t._val_batches()))
    assert any("16 of 100 samples" in m for m in logs), logs
