"""Packed rows (`data.batching: pack`) train as if each document ran alone: block-diagonal causal
attention, positions from 0 per document, no label across a boundary; HF path and train.fast."""

import pytest
import torch

from gpt2tune.data.dataset import IGNORE, Packed, collate, epoch_batches
from gpt2tune.train.objective import lm_loss, make_fast_loss

DOCS = [[1, 5, 6, 7, 2], [1, 8, 9, 10, 11, 12, 2], [1, 13, 14, 2]]


def _tiny():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=20, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa").train()


def _loss_and_grads(model, fn, batches, weights):
    model.zero_grad(set_to_none=True)
    total = 0.0
    for b, w in zip(batches, weights):
        loss, n, _ = fn(model, b)
        (loss * w).backward()
        total += float(loss) * w
    return total, {k: p.grad.clone() for k, p in model.named_parameters()}


def test_packed_batches_carry_document_starts():
    rows = [r for b in epoch_batches(DOCS, 2, "pack", 0, 0, 6) for r in b]
    assert all(isinstance(r, Packed) for r in rows)
    stream = [t for r in rows for t in r]
    assert sorted(stream) == sorted(t for d in DOCS for t in d)
    for r in rows:  # every start offset is where a bos sits, or the row's first token (a fragment)
        assert r.starts[0] == 0 and all(r[s] == 1 for s in r.starts[1:])
        assert sum(1 for t in r[1:] if t == 1) == len(r.starts) - 1


@pytest.mark.parametrize("path", ["hf", "fast"])
def test_a_packed_row_equals_its_documents_run_separately(path):
    m = _tiny()
    fn = lm_loss if path == "hf" else make_fast_loss(m, tune_malloc=False)
    row = Packed([t for d in DOCS for t in d], [0, 5, 12])  # 16 tokens, three documents
    packed = collate([row, Packed(DOCS[2], [0])], 0)  # a short second row: padded at its end
    assert packed["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3]
    assert packed["position_ids"][1].tolist() == [0, 1, 2, 3] + list(range(12))  # the padding: a segment of its own
    assert packed["labels"][0, 5] == IGNORE and packed["labels"][0, 12] == IGNORE
    alone = [collate([d], 0) for d in DOCS + [DOCS[2]]]
    n = [len(d) - 1 for d in DOCS + [DOCS[2]]]
    l_packed, g_packed = _loss_and_grads(m, fn, [packed], [1.0])
    l_alone, g_alone = _loss_and_grads(m, fn, alone, [k / sum(n) for k in n])
    assert l_packed == pytest.approx(l_alone, abs=1e-5)
    for k in g_alone:
        assert torch.allclose(g_packed[k], g_alone[k], atol=1e-6, rtol=1e-4), k
