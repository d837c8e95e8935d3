"""The fast training path (train.fast) computes HF's loss: 1e-4 in fp32, 2e-2 under bf16 autocast.

Tiny models only; no timing is asserted (bench/ measures speed)."""

import json

import pytest
import torch

from gpt2tune.data.dataset import collate, epoch_batches
from gpt2tune.model.fast_gpt2 import FastGPT2, linear_cross_entropy, right_padded, supported
from gpt2tune.train.objective import lm_loss, make_fast_loss


def tiny(seed=0, dropout=0.0, vocab=300, n_layer=2):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_head=4, n_embd=64, vocab_size=vocab, n_positions=64, resid_pdrop=dropout,
                     embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                     initializer_range=0.1)
    return GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa")


def batch(lengths=(20, 13, 7, 31), vocab=300, seed=1):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    return collate(rows, 0)


def losses_and_grads(model, loss_fn, b, dtype=None):
    model.zero_grad(set_to_none=True)
    ctx = torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
    with ctx:
        loss, n, correct = loss_fn(model, b)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), n, int(correct), grads


@pytest.mark.parametrize("dtype,tol", [(None, 1e-4), (torch.bfloat16, 2e-2)])
def test_fast_loss_equals_hf_full_model(dtype, tol):
    m = tiny()
    m.train()  # dropout 0: train mode is deterministic
    b = batch()
    fast = make_fast_loss(m)
    l1, n1, c1, g1 = losses_and_grads(m, lm_loss, b, dtype)
    l2, n2, c2, g2 = losses_and_grads(m, fast, b, dtype)
    assert abs(l1 - l2) <= tol
    assert n1 == n2 == sum((20, 13, 7, 31)) - 4
    if dtype is None:
        assert c1 == c2
    assert g1.keys() == g2.keys()
    for k in g1:  # gradients agree too (relative to their scale)
        scale = float(g1[k].abs().max()) + 1e-8
        assert float((g1[k] - g2[k]).abs().max()) / scale < (1e-3 if dtype is None else 0.1), k


def test_fast_loss_on_packed_and_unpadded_rows():
    m = tiny(seed=3).eval()
    rows = epoch_batches([list(range(3, 3 + n)) for n in (5, 9, 30, 12, 17)], 2, "pack", 0, 0, 16)[0]
    b = collate(rows, 0)
    with torch.no_grad():
        assert float(lm_loss(m, b)[0]) == pytest.approx(float(make_fast_loss(m)(m, b)[0]), abs=1e-4)


def test_left_padding_falls_back_to_hf():
    m = tiny().eval()
    rows = [[5, 6, 7, 8], [9, 10]]
    b = collate(rows, 0, left=True)
    assert not right_padded(b["attention_mask"])
    with torch.no_grad():
        assert float(make_fast_loss(m)(m, b)[0]) == float(lm_loss(m, b)[0])


@pytest.mark.parametrize("dtype,tol", [(None, 1e-4), (torch.bfloat16, 2e-2)])
def test_fast_loss_equals_hf_lora(dtype, tol):
    peft = pytest.importorskip("peft")
    m = tiny()
    cfg = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn"],
                          fan_in_fan_out=True, bias="none")
    pm = peft.get_peft_model(m, cfg)
    with torch.no_grad():  # B starts at zero: make the adapters do something
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    pm.train()
    assert supported(pm) is None
    b = batch()
    fast = make_fast_loss(pm)
    l1, _, _, g1 = losses_and_grads(pm, lm_loss, b, dtype)
    l2, _, _, g2 = losses_and_grads(pm, fast, b, dtype)
    assert abs(l1 - l2) <= tol
    assert g1.keys() == g2.keys() and all("lora_" in k for k in g1)
    if dtype is None:
        for k in g1:
            assert torch.allclose(g1[k], g2[k], atol=1e-5, rtol=1e-3), k
        return
    # bf16 copies of the frozen base are cached; an in-place change of the base refreshes them
    w = pm.get_base_model().transformer.h[0].attn.c_attn.base_layer.weight
    with torch.no_grad():
        w.mul_(1.5)
    assert torch.equal(fast.fast.cast(w, torch.bfloat16), w.detach().to(torch.bfloat16))
    l1, _, _, _ = losses_and_grads(pm, lm_loss, b, dtype)
    l2, _, _, _ = losses_and_grads(pm, fast, b, dtype)
    assert abs(l1 - l2) <= tol


def test_linear_cross_entropy_chunks_and_ignore():
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (37,))
    labels[::5] = -100
    ref = torch.nn.functional.cross_entropy(h @ w.t(), labels, ignore_index=-100)
    ref.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    loss, n, correct = linear_cross_entropy(h, w, labels, chunk=8)
    (loss * 2).backward()
    assert n == int((labels != -100).sum())
    assert float(loss) == pytest.approx(float(ref), abs=1e-5)
    assert torch.allclose(h.grad, 2 * gh, atol=1e-5) and torch.allclose(w.grad, 2 * gw, atol=1e-5)


def test_unsupported_models_keep_the_hf_path():
    m = tiny()
    m.config.scale_attn_by_inverse_layer_idx = True
    assert supported(m) and make_fast_loss(m) is None
    with pytest.raises(ValueError):
        FastGPT2(m)


def test_trainer_fast_matches_reference_and_saves_hf_names(tmp_path):
    """Two identical runs through the Trainer, train.fast off and on: same losses (fp32). The fast
    run's mid-run checkpoint holds the Hugging Face parameter names (weights, optimizer state), and
    the fast run resumed from it ends in the weights and losses of the uninterrupted run."""
    import shutil

    from safetensors.torch import load_file

    from gpt2tune.recipe import TrainSection
    from gpt2tune.train.loop import Data, Trainer

    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(3, 300, (int(n),), generator=g).tolist() for n in torch.randint(4, 40, (40,), generator=g)]

    def trainer(fast, run_dir, logs=None):
        cfg = TrainSection(precision="fp32", device="cpu", batch_size=4, max_steps=6, log_every=1, save_every=3,
                           keep_checkpoints=5, lr=1e-3, seed=3, fast=fast)
        run_dir.mkdir(exist_ok=True)
        tr = Trainer(tiny(), Data(seqs[:32], seqs[32:], 0, "group", 40), cfg, run_dir, progress=False,
                     log=logs.append if logs is not None else lambda *_: None)
        assert (tr.loss_fn is lm_loss) != fast
        return tr

    def train_losses(records, after=0):
        return [r["loss"] for r in records if r["split"] == "train" and r["step"] > after]

    out, models = {}, {}
    for fast in (False, True):
        tr = trainer(fast, tmp_path / str(fast))
        res = tr.fit()
        assert res.steps == 6
        out[fast], models[fast] = train_losses(res.records), tr.model
    assert len(out[True]) == 6
    assert out[False] == pytest.approx(out[True], abs=2e-4)  # AdamW foreach vs fused: tiny drift

    # the fast run's step-3 checkpoint: the HF model's own parameter names, as the reference run's
    hf = tiny()
    hf_names = {n for n, p in hf.named_parameters() if p.requires_grad}
    assert "transformer.h.0.attn.c_attn.weight" in hf_names
    mid = tmp_path / "True" / "checkpoints" / "step-3"
    weights = load_file(str(mid / "model.safetensors"))
    assert set(weights) == hf_names
    assert set(load_file(str(tmp_path / "False" / "checkpoints" / "step-3" / "model.safetensors"))) == hf_names
    opt_keys = load_file(str(mid / "optimizer.safetensors"))
    assert {k.rsplit("/", 1)[0] for k in opt_keys} == hf_names
    state = json.loads((mid / "state.json").read_text())
    assert state["step"] == 3 and {n for grp in state["optimizer_groups"] for n in grp["params"]} == hf_names
    missing, unexpected = hf.load_state_dict(weights, strict=False)  # a plain HF model takes them as they are
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # lm_head is tied to wte

    # the run cut after step 3 resumes through the fast path into the uninterrupted run's weights
    shutil.copytree(tmp_path / "True", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-6")
    logs = []
    tr = trainer(True, tmp_path / "cut", logs)
    res = tr.fit(resume=True)
    assert res.steps == 6
    assert any("step-3 (step 3 of 6)" in m for m in logs), logs
    assert train_losses(res.records, after=3) == pytest.approx(out[True][3:], abs=1e-6)
    a, b = dict(models[True].named_parameters()), dict(tr.model.named_parameters())
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_accumulated_scaled_gradients_match():
    """grad_accum: (loss / 2).backward() twice, gradients accumulate into the tied embedding."""
    m = tiny(seed=4)
    m.train()
    b1, b2 = batch(seed=1), batch(lengths=(9, 30, 12, 5), seed=2)
    grads = []
    for fn in (lm_loss, make_fast_loss(m, tune_malloc=False)):
        m.zero_grad(set_to_none=True)
        for b in (b1, b2):
            (fn(m, b)[0] / 2).backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters()})
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-3), k


def test_fast_dropout_rate_and_scale():
    from gpt2tune.model.fast_gpt2 import dropout

    torch.manual_seed(0)
    x = torch.ones(1000, 1001)
    y = dropout(x, 0.1)
    dropped = float((y == 0).float().mean())
    assert abs(dropped - 0.1) < 0.003
    flat = (y == 0).float().reshape(-1)
    assert all(abs(float(flat[k::4].mean()) - 0.1) < 0.005 for k in range(4))  # every random lane
    assert abs(float(y.mean()) - 1.0) < 0.005
    assert torch.equal(dropout(x, 0.0), x)
    x.requires_grad_(True)
    y = dropout(x, 0.5)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # gradient flows through the kept entries, same scale


def test_bf16_weight_copies_follow_fused_optimizer_steps():
    """Cached bf16 weight copies refresh after every optimizer step (fused AdamW does not bump
    version counters) and after in-place loads."""
    m = tiny(seed=6)
    m.train()
    fast = make_fast_loss(m, tune_malloc=False)
    opt = torch.optim.AdamW(m.parameters(), lr=0.05, fused=True)
    b = batch()
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fast(m, b)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        w = m.transformer.h[1].mlp.c_fc.weight
        with torch.autocast("cpu", dtype=torch.bfloat16):
            l_hf = float(lm_loss(m, b)[0].detach())
            l_fast = float(fast(m, b)[0].detach())
        assert torch.equal(fast.fast.cast.raw(w, torch.bfloat16), w.detach().to(torch.bfloat16))
        assert abs(l_hf - l_fast) <= 2e-2
    m.load_state_dict({k: v * 0.5 for k, v in m.state_dict().items()})
    assert torch.equal(fast.fast.cast.raw(w, torch.bfloat16), w.detach().to(torch.bfloat16))


def test_written_out_attention_equals_sdpa_and_stays_causal():
    import torch.nn.functional as F

    from gpt2tune.model.fast_gpt2 import causal_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, requires_grad=True) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out = causal_attention(q, k, v, 0.0)
    assert torch.allclose(out, ref, atol=1e-6)
    g = torch.randn_like(ref)
    ga = torch.autograd.grad(ref, (q, k, v), g)
    gb = torch.autograd.grad(out, (q, k, v), g)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ga, gb))
    # with dropout: position t never sees a later value, and some probabilities are dropped
    v2 = v.detach().clone()
    v2[:, :, 10:] += 100.0
    torch.manual_seed(5)
    a = causal_attention(q, k, v.detach(), 0.5)
    torch.manual_seed(5)
    b = causal_attention(q, k, v2, 0.5)
    assert torch.equal(a[:, :, :10], b[:, :, :10]) and not torch.allclose(a[:, :, 10:], b[:, :, 10:])
    assert not torch.allclose(a, causal_attention(q, k, v.detach(), 0.0))


def test_clip_inside_the_fused_optimizer_equals_clip_then_step():
    import copy

    from gpt2tune.train.optim import build_optimizer, clip_and_step

    torch.manual_seed(0)
    m1 = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4))
    m2 = copy.deepcopy(m1)
    o1, o2 = (build_optimizer(m, 1e-2, 0.01, (0.9, 0.999), torch.device("cpu"), fused=True) for m in (m1, m2))
    clipped = 0
    for i in range(6):
        x = torch.randn(8, 16)
        for m, o, new in ((m1, o1, False), (m2, o2, True)):
            (m(x).pow(2).sum() * (10 if i % 2 else 1e-4)).backward()  # alternate clipped and unclipped steps
            ps = list(m.parameters())
            if new:
                clip_and_step(o, ps, 1.0)
            else:
                clipped += float(torch.nn.utils.clip_grad_norm_(ps, 1.0)) > 1.0
                o.step()
            o.zero_grad(set_to_none=True)
    assert clipped == 3 and not hasattr(o2, "grad_scale")
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_fast_loss_keeps_gradient_buffers_and_refuses_two_forwards_before_backward():
    m = tiny()
    fn = make_fast_loss(m, tune_malloc=False)
    b = batch()
    loss, _, _ = fn(m, b)
    loss.backward()
    first = {n: p.grad for n, p in m.named_parameters()}
    ref = {n: g.clone() for n, g in first.items()}
    for p in m.parameters():
        p.grad = None
    loss, _, _ = fn(m, b)
    loss.backward()
    for n, p in m.named_parameters():  # the same gradient, written into the same kept buffer
        assert torch.allclose(p.grad, ref[n], atol=1e-6), n
    assert m.lm_head.weight.grad.data_ptr() == first["transformer.wte.weight"].data_ptr()
    for p in m.parameters():
        p.grad = None
    l1, _, _ = fn(m, b)
    l2, _, _ = fn(m, batch(seed=2))
    with pytest.raises(RuntimeError, match="before this one's backward"):
        l1.backward()


@pytest.mark.parametrize("dtype,tol", [(None, 1e-4), (torch.bfloat16, 2e-2)])
def test_fast_loss_applies_bottleneck_adapters(dtype, tol):
    from gpt2tune.method.adapter import add_adapters
    from gpt2tune.method.config import AdapterMethod

    m = add_adapters(tiny(), AdapterMethod(bottleneck=8))
    with torch.no_grad():  # a fresh adapter is the identity: make it do something
        for n, p in m.named_parameters():
            if ".adapter.up." in n:
                p.normal_(0, 0.1)
    m.train()
    assert supported(m) is None
    b = batch()
    l1, _, _, g1 = losses_and_grads(m, lm_loss, b, dtype)
    l2, _, _, g2 = losses_and_grads(m, make_fast_loss(m), b, dtype)
    assert abs(l1 - l2) <= tol
    assert g1.keys() == g2.keys() and g1 and all(".adapter." in k for k in g1)
    for k in g1:
        assert torch.allclose(g1[k], g2[k], atol=1e-5 if dtype is None else 5e-2, rtol=1e-3 if dtype is None else 1e-1), k
    m.transformer.h[1].mlp.c_fc.register_forward_hook(lambda *a: None)
    assert "forward hooks" in supported(m) and make_fast_loss(m) is None


def test_raw_peft_prompt_tuning_keeps_the_hf_path():
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(tiny(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert "prompt" in supported(pm) and make_fast_loss(pm) is None
