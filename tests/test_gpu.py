"""GPU tests (`make test-gpu`): the fast path against Hugging Face in bf16 and fp16, decoding,
resume, and a 2-GPU torchrun equivalence run. Skipped, with the reason, where CUDA is absent."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _tiny(vocab=3000):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=128, vocab_size=vocab, n_positions=128, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa").cuda().train()


def _batch(vocab=3000, rows=16, length=100):
    from gpt2tune.data.dataset import collate

    g = torch.Generator().manual_seed(1)
    b = collate([torch.randint(3, vocab, (length - i,), generator=g).tolist() for i in range(rows)], 0)
    return {k: v.cuda() for k, v in b.items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_loss_and_gradients_equal_hf_on_gpu(dtype):
    from gpt2tune.train.objective import make_fast_loss
    from gpt2tune.train.objective import lm_loss

    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    m, b = _tiny(), _batch()

    def run(fn):
        m.zero_grad(set_to_none=True)
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
        with torch.autocast("cuda", dtype=dtype):
            loss, n, _ = fn(m, b)
        scaler.scale(loss).backward()
        inv = 1.0 / scaler.get_scale() if dtype == torch.float16 else 1.0
        return float(loss), {k: p.grad.float() * inv for k, p in m.named_parameters() if p.grad is not None}

    l1, g1 = run(lm_loss)
    l2, g2 = run(make_fast_loss(m))
    assert abs(l1 - l2) < 2e-2
    for k in g1:
        assert float((g1[k] - g2[k]).norm() / (g1[k].norm() + 1e-12)) < 0.05, k


def test_greedy_decoding_equals_hf_on_gpu():
    from gpt2tune.generate.decode import generate_ids
    from gpt2tune.generate.sampling import Sampling

    m = _tiny().eval()
    prompt = [1, 50, 60, 70]
    ref = m.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                     eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    ours = generate_ids(m, prompt, None, Sampling(max_new_tokens=24, greedy=True))
    assert ours[0] == ref


def test_resume_on_gpu_continues_the_run(tmp_path):
    from gpt2tune.model.build import build_scratch
    from gpt2tune.model.tokenizer import Framing
    from gpt2tune.recipe import TrainSection
    from gpt2tune.train.loop import Data, Trainer

    seqs = [[1] + [3 + (i * 7 + j) % 40 for j in range(5 + i % 9)] + [2] for i in range(64)]

    def trainer(run, steps):
        torch.manual_seed(0)
        model = build_scratch("nano", 50, Framing(1, 2, 0, True), n_positions=32)
        cfg = TrainSection(device="cuda", precision="auto", fast=True, max_steps=steps, batch_size=8, save_every=3)
        return Trainer(model, Data(seqs, seqs[:8], 0), cfg, run, progress=False, log=lambda m: None)

    full = trainer(tmp_path / "full", 6)
    full.fit()
    part = trainer(tmp_path / "part", 6)
    part.total_steps = 6
    import shutil

    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-3", tmp_path / "part" / "checkpoints" / "step-3")
    part.fit(resume=True)  # optimizer state restored on the parameters' device (fused AdamW on CUDA)
    for (k, a), b in zip(full.model.state_dict().items(), part.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), k


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_equal_one_gpu_with_double_batch(tmp_path):
    """torchrun on 2 GPUs (NCCL, one GPU per rank from LOCAL_RANK, every collective's tensors checked
    to be on the rank's GPU by tests/dist_probe.py) == one GPU with twice the batch."""
    from test_distributed import RECIPE

    from conftest import ZH_TEXT, write_recipe
    from safetensors.torch import load_file

    src = tmp_path / "poems.txt"
    src.write_text("\n".join(ZH_TEXT * 25), encoding="utf-8")

    def run(name, world, bs):
        r = write_recipe(tmp_path / f"{name}.yaml", RECIPE.format(src=src, out=tmp_path / name, bs=bs, accum=2,
                                                                  steps=10, fast="true").replace("precision: fp32", "precision: fp32, device: cuda"))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
               str(ROOT / "tests" / "dist_probe.py"), "train", str(r), "--no-progress"]
        p = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        return load_file(str(tmp_path / name / "model" / "model.safetensors"))

    one, two = run("one", 1, 4), run("two", 2, 2)
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-4, rtol=1e-3), k
