"""`train.gradient_checkpointing` (Hugging Face forward and train.fast) computes exactly what the
plain forward computes while keeping far fewer tensors for backward; the memory estimate stops a
run that cannot fit, with advice."""


import pytest
import torch

from gpt2tune.errors import UserError
from gpt2tune.train import memory
from gpt2tune.train.memory import enable_gradient_checkpointing, estimate
from gpt2tune.train.objective import lm_loss, make_fast_loss


def _model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=4, n_head=4, n_embd=64, vocab_size=300, n_positions=64, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa").train()  # dropout on


def _batch():
    ids = torch.randint(3, 300, (4, 48), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _run(model, loss_fn):
    """(loss, gradients, bytes of the tensors autograd saved for backward)."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(7)  # the same dropout masks on both sides
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model, _batch())[0]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads, sum(saved)


@pytest.mark.parametrize("path", ["hf", "fast"])
def test_checkpointing_changes_what_is_kept_not_what_is_computed(path):
    plain, ckpt = _model(), _model()
    if path == "hf":
        enable_gradient_checkpointing(ckpt)
        fa, fb = lm_loss, lm_loss
    else:
        fa = make_fast_loss(plain, tune_malloc=False, direct_grads=False)
        fb = make_fast_loss(ckpt, tune_malloc=False, direct_grads=False, checkpoint=True)
    la, ga, kept_a = _run(plain, fa)
    lb, gb, kept_b = _run(ckpt, fb)
    assert la == lb and ga.keys() == gb.keys()
    assert all(torch.equal(ga[n], gb[n]) for n in ga)
    assert kept_b < 0.5 * kept_a, (kept_a, kept_b)  # only each block's input is kept across the forward


def test_trainer_with_checkpointing_trains_the_same_weights(tmp_path):
    from gpt2tune.model.build import build_scratch
    from gpt2tune.model.tokenizer import Framing
    from gpt2tune.recipe import TrainSection
    from gpt2tune.train.loop import Data, Trainer

    seqs = [[1] + [3 + (i * 7 + j) % 25 for j in range(4 + i % 11)] + [2] for i in range(40)]
    out = []
    for on, fast in ((False, False), (True, False), (False, True), (True, True)):
        model = build_scratch("nano", 30, Framing(1, 2, 0, True), n_positions=24, seed=0)
        cfg = TrainSection(precision="fp32", max_steps=4, batch_size=8, lr=1e-3, num_threads=1, log_every=1,
                           gradient_checkpointing=on, fast=fast)
        (tmp_path / f"{on}{fast}").mkdir()
        Trainer(model, Data(seqs, seqs[:8], 0), cfg, tmp_path / f"{on}{fast}", progress=False,
                log=lambda m: None).fit()
        out.append({n: p.detach().clone() for n, p in model.named_parameters()})
    # the same updates: train.fast bit for bit; the HF path up to the order of the tied-embedding
    # gradient's sums in backward (measured 6e-7)
    assert all(torch.allclose(out[0][n], out[1][n], rtol=0, atol=1e-5) for n in out[0])
    assert all(torch.equal(out[2][n], out[3][n]) for n in out[2])
    assert any(not torch.equal(out[0][n], out[2][n]) for n in out[0])  # four real, different runs


def test_estimate_grows_with_the_batch_and_shrinks_with_checkpointing():
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):  # shapes only
        m = GPT2LMHeadModel(GPT2Config(n_layer=12, n_head=12, n_embd=768))
    one, eight = estimate(m, 1, 512, torch.float32), estimate(m, 8, 512, torch.float32)
    assert eight.weights == one.weights == 124439808 * 4  # GPT-2 124M in fp32
    assert eight.optimizer == 2 * eight.gradients == 2 * eight.weights
    assert eight.activations == pytest.approx(8 * one.activations)
    ck = estimate(m, 8, 512, torch.float32, checkpointing=True)
    assert ck.activations < 0.2 * eight.activations
    assert estimate(m, 8, 512, torch.float32, chunked_loss=True).logits < 0.2 * eight.logits


def test_a_run_that_cannot_fit_stops_with_advice(tmp_path, monkeypatch):
    from gpt2tune.model.build import build_scratch
    from gpt2tune.model.tokenizer import Framing
    from gpt2tune.recipe import TrainSection
    from gpt2tune.train.loop import Data, Trainer

    monkeypatch.setattr(memory, "free_memory", lambda device: 1 << 20)  # 1 MiB free
    seqs = [[1, 5, 6, 7, 2]] * 8
    logs = []

    def trainer(**kw):
        model = build_scratch("nano", 30, Framing(1, 2, 0, True), n_positions=24, seed=0)
        cfg = TrainSection(precision="fp32", max_steps=1, batch_size=8, num_threads=1, **kw)
        return Trainer(model, Data(seqs, [], 0), cfg, tmp_path, progress=False, log=logs.append)

    with pytest.raises(UserError, match="gradient_checkpointing: true.*grad_accum"):
        trainer().fit()
    assert logs and logs[0].startswith("memory: about")
    trainer(check_memory=False).fit()  # the user may try anyway


def test_the_estimate_counts_every_row_a_sample_makes(tmp_path, monkeypatch):
    """A preference pair is two rows (chosen, rejected): its batch holds 2 x batch_size rows."""
    from gpt2tune.model.build import build_scratch
    from gpt2tune.model.tokenizer import Framing
    from gpt2tune.recipe import TrainSection
    from gpt2tune.train.loop import Data, Trainer

    seen = []
    real = memory.estimate
    monkeypatch.setattr(memory, "estimate", lambda model, batch, *a, **k: seen.append(batch) or real(model, batch, *a, **k))
    seqs = [[1, 5, 6, 7, 2]] * 8
    for per in (1, 2):
        model = build_scratch("nano", 30, Framing(1, 2, 0, True), n_positions=24, seed=0)
        cfg = TrainSection(precision="fp32", max_steps=1, batch_size=4, num_threads=1)
        (tmp_path / str(per)).mkdir()
        Trainer(model, Data(seqs, [], 0, rows_per_sample=per), cfg, tmp_path / str(per), progress=False,
                log=lambda m: None).fit()
    assert seen == [4, 8]

