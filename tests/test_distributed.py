"""Several processes through PyTorch's DDP: N processes x batch b == 1 process x batch N*b with the
fast path and gradient accumulation, ranks with an empty share of a batch, and collectives whose
tensors live on the backend's device (a GPU for NCCL)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, ZH_TEXT, write_recipe
from gpt2tune.train import distributed

RECIPE = """
task: causal-lm
model: {{init: scratch, size: nano, tokenizer: from-data, dropout: 0.0}}
data: {{source: "text:{src}", val_fraction: 0.1, max_length: 40}}
train: {{precision: fp32, fast: {fast}, lr: 2.0e-3, batch_size: {bs}, grad_accum: {accum}, max_steps: {steps},
         log_every: 5, seed: 3, num_threads: 1, distributed: {dist}, save_every: {save}, keep_checkpoints: 10}}
output: {{dir: "{out}"}}
"""


def test_collectives_use_the_backends_device(monkeypatch):
    """NCCL needs every collective's tensors on the rank's GPU; gloo on the CPU."""
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert distributed.comm_device() == torch.device("cuda", 1)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda *a: "gloo")
    assert distributed.comm_device() == torch.device("cpu")
    seen = []
    monkeypatch.setattr(distributed, "comm_device", lambda: torch.device("meta"))
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda t, *a, **k: seen.append(t.device))
    monkeypatch.setattr(distributed.dist, "all_gather", lambda parts, t, *a, **k: seen.append(t.device))
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    for call in (lambda: distributed.sum_all([1.0, 2.0]), lambda: distributed.gather_states({"x": torch.ones(2)})):
        try:
            call()
        except (NotImplementedError, RuntimeError):  # a meta tensor has no values to read back
            pass
    assert seen == [torch.device("meta")] * 2


def test_shards_differ_by_at_most_one_row():
    rows = list(range(7))
    parts = [distributed.shard(rows, r, 3) for r in range(3)]
    assert parts == [[0, 1, 2], [3, 4], [5, 6]]
    assert [distributed.shard([9], r, 2) for r in range(2)] == [[9], []]  # fewer rows than ranks


def _run(tmp_path, name, world, bs, accum, steps, fast, dist="ddp", save=0, extra=()):
    src = tmp_path / "poems.txt"
    if not src.exists():  # 99 lines: 89 training samples, so the epoch's last global batch of 4 has one row
        src.write_text("\n".join((ZH_TEXT * 25)[:99]), encoding="utf-8")
    r = write_recipe(tmp_path / f"{name}.yaml", RECIPE.format(src=src, out=tmp_path / name, bs=bs, accum=accum,
                                                              steps=steps, fast=str(fast).lower(), dist=dist,
                                                              save=save))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if world == 1:
        cmd = [sys.executable, "-m", "gpt2tune", "train", str(r), "--no-progress", *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
               str(ROOT / "tests" / "dist_probe.py"), "train", str(r), "--no-progress", *extra]
    p = _launch(cmd, env, tmp_path / name, attempts=2 if world > 1 else 1)
    return load_file(str(tmp_path / name / "model" / "model.safetensors")), p.stderr


def _launch(cmd, env, out, attempts):
    """Run `cmd`; a multi-process run that crashes or hangs in the launcher (seen rarely with gloo on a
    loaded 2-core machine: a rank aborting at exit, a barrier failing) runs once more from the same
    run folder. What it computes is checked as strictly either way."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as keep:
        saved = Path(keep) / "run"
        if out.exists():
            shutil.copytree(out, saved)
        for attempt in range(attempts):
            try:
                p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
            except subprocess.TimeoutExpired as err:
                failure = f"timed out after {err.timeout} s: {(err.stderr or b'')[-3000:]!r}"
            else:
                if p.returncode == 0:
                    return p
                failure = p.stderr[-3000:]
            shutil.rmtree(out, ignore_errors=True)  # the next attempt starts where this one did
            if saved.exists():
                shutil.copytree(saved, out)
        raise AssertionError(f"{attempts} attempt(s) failed; the last: {failure}")


@pytest.mark.skipif(sys.platform != "linux", reason="gloo DDP test runs on Linux")
def test_ddp_fast_accumulation_and_an_empty_rank_equal_one_process(tmp_path):
    """2 processes x batch 1 x 2 micro-batches, train.fast, == 1 process x batch 2 x 2 micro-batches,
    through an epoch end where a global batch has a single row (rank 1 gets none)."""
    one, err1 = _run(tmp_path, "one", 1, 2, 2, 26, True)
    assert "89 training samples" in err1, err1[-2000:]  # 89 = 44 x 2 + 1: the last batch has one row
    two, _ = _run(tmp_path, "two", 2, 1, 2, 26, True)
    for k in one:
        assert torch.allclose(one[k], two[k], atol=2e-5, rtol=1e-4), (k, float((one[k] - two[k]).abs().max()))


@pytest.mark.skipif(sys.platform != "linux", reason="gloo FSDP test runs on Linux")
def test_fsdp_two_processes_equal_one_process_and_resume(tmp_path):
    """train.distributed fsdp (FSDP2: weights, gradients and AdamW state sharded over 2 processes) gives
    the update of one process with the whole batch; its checkpoints hold whole tensors under the usual
    names, and resuming from one ends where the uninterrupted run ended."""
    import shutil

    one, _ = _run(tmp_path, "one", 1, 4, 1, 6, False)
    two, err = _run(tmp_path, "two", 2, 2, 1, 6, False, dist="fsdp", save=3)
    for k in one:
        assert torch.allclose(one[k], two[k], atol=2e-5, rtol=1e-4), (k, float((one[k] - two[k]).abs().max()))
    ck = load_file(str(tmp_path / "two" / "checkpoints" / "step-3" / "model.safetensors"))
    assert set(ck) == set(one) - {"lm_head.weight"} or set(ck) <= set(one), sorted(ck)[:5]
    (tmp_path / "res" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "two" / "checkpoints" / "step-3", tmp_path / "res" / "checkpoints" / "step-3")
    shutil.copy(tmp_path / "two" / "recipe.yaml", tmp_path / "res" / "recipe.yaml")
    res, err = _run(tmp_path, "res", 2, 2, 1, 6, False, dist="fsdp", save=3, extra=("--resume",))
    assert "resumed from" in err, err[-2000:]
    for k in two:
        assert torch.allclose(two[k], res[k], atol=1e-6), (k, float((two[k] - res[k]).abs().max()))
