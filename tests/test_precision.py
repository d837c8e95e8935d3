"""Precision that is right on every device: what `precision: auto` picks, and fp16 gradients of the
fast path (GPUs without bf16) checked on the CPU against the Hugging Face path under a GradScaler."""

import pytest
import torch

from gpt2tune.data.dataset import collate
from gpt2tune.errors import UserError
from gpt2tune.model.cpu import cpu_flags, cpu_has_bf16
from gpt2tune.train.device import auto_precision, pick_precision
from gpt2tune.train.objective import lm_loss, make_fast_loss


@pytest.mark.parametrize("device,cpu_bf16,cuda_bf16,want", [
    ("cpu", False, False, torch.float32),   # AVX2-only CPUs: bf16 would be emulated
    ("cpu", True, False, torch.bfloat16),   # AMX / AVX512-BF16
    ("cuda", False, True, torch.bfloat16),  # Ampere and newer
    ("cuda", False, False, torch.float16),  # T4, V100: fp16 with loss scaling
    ("mps", False, False, torch.float32),
])
def test_auto_precision(device, cpu_bf16, cuda_bf16, want):
    assert auto_precision(device, cpu_bf16=cpu_bf16, cuda_bf16=cuda_bf16) == want


def test_cpu_bf16_from_flags(monkeypatch):
    monkeypatch.delenv("GPT2TUNE_CPU_BF16", raising=False)
    assert cpu_has_bf16(frozenset({"avx2", "fma"})) is False
    assert cpu_has_bf16(frozenset({"avx512f", "avx512_bf16"})) is True
    assert cpu_has_bf16(frozenset({"amx_bf16", "amx_tile"})) is True
    flags = cpu_flags()
    assert cpu_has_bf16() == ("amx_bf16" in flags or "avx512_bf16" in flags)


def test_cpu_bf16_override(monkeypatch):
    monkeypatch.setenv("GPT2TUNE_CPU_BF16", "1")
    assert cpu_has_bf16() is True
    assert pick_precision("auto", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setenv("GPT2TUNE_CPU_BF16", "0")
    assert cpu_has_bf16() is False
    assert pick_precision("auto", torch.device("cpu")) == torch.float32
    assert cpu_has_bf16(frozenset({"amx_bf16"})) is True   # explicit flags are not overridden
    monkeypatch.setenv("GPT2TUNE_CPU_BF16", "yes")
    with pytest.raises(UserError, match="GPT2TUNE_CPU_BF16"):
        cpu_has_bf16()


def _model(vocab):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=vocab, n_positions=64, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.02, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa").train()


def _scaled_grads(model, loss_fn, batch):
    """Gradients of one fp16-autocast step through a GradScaler, unscaled (what the optimizer sees)."""
    model.zero_grad(set_to_none=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    with torch.autocast("cpu", dtype=torch.float16):
        loss, n, _ = loss_fn(model, batch)
    scaler.scale(loss).backward()
    inv = 1.0 / scaler.get_scale()
    return {k: p.grad.float() * inv for k, p in model.named_parameters() if p.grad is not None}


def test_fp16_fast_gradients_equal_hf_under_grad_scaler():
    """Near-uniform predictions over 8,000 tokens at 2,048 positions: each softmax/n term is ~6e-8,
    at fp16's smallest subnormal. Computed in fp16 before the loss scale (as the fast path once did)
    they flush to zero or to one subnormal step; HF scales first. The gradients must agree."""
    V = 8000
    m = _model(V)
    g = torch.Generator().manual_seed(1)
    batch = collate([torch.randint(0, V, (64,), generator=g).tolist() for _ in range(32)], 0)
    ref = _scaled_grads(m, lm_loss, batch)
    got = _scaled_grads(m, make_fast_loss(m, tune_malloc=False), batch)
    assert ref.keys() == got.keys()
    for k in ref:
        err = float((ref[k] - got[k]).norm() / ref[k].norm())
        assert err < 0.005, (k, err)
    # the rows of the head that no label touches get only softmax terms: the ones that underflow
    w = "transformer.wte.weight"
    unseen = torch.ones(V, dtype=torch.bool)
    unseen[batch["labels"].flatten()] = False
    unseen[batch["input_ids"].flatten()] = False
    err = float((ref[w][unseen] - got[w][unseen]).norm() / ref[w][unseen].norm())
    assert err < 0.005, err
