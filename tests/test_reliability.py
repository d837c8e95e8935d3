"""Nothing lost: exact resume after SIGKILL, Ctrl-C checkpoints, non-finite losses, DDP."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, ZH_TEXT, write_recipe

RECIPE = """
task: causal-lm
model: {{init: scratch, size: nano, tokenizer: from-data, dropout: {dropout}}}
data: {{source: "text:{src}", val_fraction: 0.1, max_length: 40}}
train: {{precision: fp32, lr: 2.0e-3, batch_size: {bs}, max_steps: {steps}, save_every: {save}, log_every: 5,
         seed: 3, num_threads: 1, keep_checkpoints: 50}}
output: {{dir: "{out}"}}
"""


def recipe(tmp_path, name, steps=60, save=5, bs=4, dropout=0.1):
    src = tmp_path / "poems.txt"
    if not src.exists():
        src.write_text("\n".join(ZH_TEXT * 25), encoding="utf-8")
    return write_recipe(tmp_path / f"{name}.yaml",
                        RECIPE.format(src=src, out=tmp_path / name, steps=steps, save=save, bs=bs, dropout=dropout))


def gpt2tune(*args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "gpt2tune", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def wait_for(path: Path, proc, timeout=120):
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.communicate()[1][-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.05)


def weights(run: Path):
    return load_file(str(run / "model" / "model.safetensors"))


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path):
    ref = gpt2tune("train", recipe(tmp_path, "ref"), "--no-progress")
    assert ref.wait(timeout=300) == 0, ref.communicate()[1]

    r = recipe(tmp_path, "crash")
    p = gpt2tune("train", r, "--no-progress")
    wait_for(tmp_path / "crash" / "checkpoints" / "step-15", p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (tmp_path / "crash" / "model").exists()  # really killed mid-run
    done = sorted(int(d.name.split("-")[1]) for d in (tmp_path / "crash" / "checkpoints").glob("step-*"))
    assert done and max(done) < 60
    q = gpt2tune("train", r, "--resume", "--no-progress")
    out, err = q.communicate(timeout=300)
    assert q.returncode == 0, err
    assert "resumed from" in err
    a, b = weights(tmp_path / "ref"), weights(tmp_path / "crash")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma = [json.loads(l) for l in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(l) for l in (tmp_path / "crash" / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in ma if m["split"] == "validation"] == [m["loss"] for m in mb if m["split"] == "validation"]
    assert [m["step"] for m in ma] == [m["step"] for m in mb]


def test_signals_at_random_moments_then_resume_is_bit_identical(tmp_path):
    """Ctrl-C (SIGINT) and SIGTERM (schedulers, containers) stop at the next step boundary with a
    checkpoint of that step; resuming twice ends with the uninterrupted run's exact weights. Which
    signal comes first is drawn, like the moments."""
    import random

    first, second = random.sample([signal.SIGINT, signal.SIGTERM], 2)

    ref = gpt2tune("train", recipe(tmp_path, "ref", steps=200, save=10), "--no-progress")
    r = recipe(tmp_path, "int", steps=200, save=10)
    # a moment is a regular checkpoint 0-3 saves after the run's first (training is under way) plus
    # 0-50 ms: drawn in steps, so a fast machine cannot finish the 200 steps before the signal
    moments = [(10 * random.randrange(4), random.uniform(0.0, 0.05)) for _ in range(2)]
    ck = tmp_path / "int" / "checkpoints"
    stopped = []
    for sig, (later, delay), extra in [(first, moments[0], ()), (second, moments[1], ("--resume",))]:
        p = gpt2tune("train", r, "--no-progress", *extra)
        nxt = 10 * (max(stopped, default=0) // 10 + 1) + later
        wait_for(ck / f"step-{nxt}", p)
        time.sleep(delay)
        p.send_signal(sig)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 130, (sig, moments, err[-2000:])
        assert f"({sig.name})" in err and "--resume" in err and "Traceback" not in err, err[-2000:]
        at = int(err.split("interrupted at step ")[1].split()[0])
        assert (ck / f"step-{at}").is_dir(), (at, sorted(d.name for d in ck.iterdir()))  # saved the step it stopped at
        assert not list(ck.glob(".tmp-*"))
        stopped.append(at)
    assert stopped[1] > stopped[0], stopped
    p = gpt2tune("train", r, "--no-progress", "--resume")
    assert p.wait(timeout=300) == 0, p.communicate()[1][-2000:]
    assert ref.wait(timeout=300) == 0, ref.communicate()[1][-2000:]
    a, b = weights(tmp_path / "ref"), weights(tmp_path / "int")
    assert all(torch.equal(a[k], b[k]) for k in a), (stopped, moments)


def _trainer(tmp_path, on_nonfinite, bad_call=3):
    from gpt2tune.model.build import build_scratch
    from gpt2tune.model.tokenizer import Framing
    from gpt2tune.recipe import TrainSection
    from gpt2tune.train.loop import Data, Trainer
    from gpt2tune.train.objective import lm_loss

    calls = {"n": 0}

    def loss_fn(model, batch):
        loss, n, c = lm_loss(model, batch)
        calls["n"] += int(model.training)  # count training steps only (not validation)
        if model.training and calls["n"] == bad_call:
            loss = loss * float("nan")
        return loss, n, c

    model = build_scratch("nano", 20, Framing(1, 2, 0, True), n_positions=16)
    seqs = [[1, 3 + i % 10, 4, 5, 2] for i in range(40)]
    cfg = TrainSection(precision="fp32", max_steps=6, batch_size=4, on_nonfinite=on_nonfinite, save_every=2)
    return Trainer(model, Data(seqs, seqs[:4], 0), cfg, tmp_path, loss_fn=loss_fn, progress=False, log=lambda m: None)


def test_nonfinite_loss_stops_naming_the_step_and_keeps_checkpoint(tmp_path):
    from gpt2tune.errors import UserError

    t = _trainer(tmp_path, "stop")
    with pytest.raises(UserError, match="at step 3; stopped"):
        t.fit()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-2"]


def test_nonfinite_loss_skip_and_continue(tmp_path):
    t = _trainer(tmp_path, "skip")
    res = t.fit()
    assert res.steps == 6 and res.final_eval["loss"] == res.final_eval["loss"]  # finite


@pytest.mark.skipif(sys.platform != "linux", reason="gloo DDP test runs on Linux")
def test_ddp_two_processes_equal_one_process_with_double_batch(tmp_path):
    one = recipe(tmp_path, "one", steps=12, save=0, bs=4, dropout=0.0)
    two = recipe(tmp_path, "two", steps=12, save=0, bs=2, dropout=0.0)
    p1 = gpt2tune("train", one, "--no-progress")
    assert p1.wait(timeout=300) == 0, p1.communicate()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                         "-m", "gpt2tune", "train", str(two), "--no-progress"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
    assert p2.returncode == 0, p2.stderr[-3000:]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5, rtol=1e-4), k
    la = [json.loads(l) for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l) for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in la] == [m["step"] for m in lb]  # rank 0 alone wrote the metrics
    for x, y in zip(la, lb):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-4)


def test_two_process_resume_restores_every_ranks_random_stream(tmp_path):
    """With dropout on, each rank draws its own masks; a resumed 2-process run (from the step-4
    checkpoint) ends with weights identical to the uninterrupted run. The first run starts with an
    empty corpus cache: rank 0 builds the entry while rank 1 waits, then both read it."""
    import shutil

    env = dict(os.environ, OMP_NUM_THREADS="1", GPT2TUNE_CACHE_DIR=str(tmp_path / "cache"))

    def torchrun(r, *extra):
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            "-m", "gpt2tune", "train", str(r), "--no-progress", *extra], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        return p

    torchrun(recipe(tmp_path, "ref", steps=12, save=4, bs=2, dropout=0.1))
    assert json.loads((tmp_path / "ref" / "data.json").read_text())["cache"]["hit"] is False  # built under torchrun
    rng = load_file(str(tmp_path / "ref" / "checkpoints" / "step-4" / "rng.safetensors"))
    assert not torch.equal(rng["rank0/torch"], rng["rank1/torch"])  # the ranks' streams really differ
    res = recipe(tmp_path, "res", steps=12, save=4, bs=2, dropout=0.1)
    shutil.copytree(tmp_path / "ref", tmp_path / "res")
    shutil.rmtree(tmp_path / "res" / "model")
    for step in (8, 12):
        shutil.rmtree(tmp_path / "res" / "checkpoints" / f"step-{step}")
    p = torchrun(res, "--resume")
    assert "resumed from" in p.stderr and "step 4 of 12" in p.stderr
    a, b = weights(tmp_path / "ref"), weights(tmp_path / "res")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")  # after a step the scaler skipped
def test_fp16_training_scales_the_loss_and_resumes_the_scale(tmp_path, monkeypatch):
    """fp16 (what `auto` picks on GPUs without bf16) trains through a GradScaler: gradients
    that would underflow in fp16 still update the weights, and checkpoints keep the scale, so a
    run resumed mid-way continues with the saved scale (not the default 65536) into the weights
    of the uninterrupted run. Run on the CPU by forcing the Trainer's dtype (CPU autocast has fp16)."""
    from gpt2tune.model.build import build_scratch
    from gpt2tune.model.tokenizer import Framing
    from gpt2tune.recipe import TrainSection
    from gpt2tune.train.loop import Data, Trainer
    from gpt2tune.train.objective import lm_loss

    seqs = [[1, 3 + i % 10, 4, 5, 2] for i in range(40)]
    default_scale = torch.amp.GradScaler("cpu").get_scale()
    assert default_scale == 65536.0

    class RecordingScaler(torch.amp.GradScaler):
        """The loop's GradScaler, remembering the scale it first multiplied a loss by."""
        made: list = []

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.first_scale = None
            RecordingScaler.made.append(self)

        def scale(self, outputs):
            if self.first_scale is None:
                self.first_scale = self.get_scale()
            return super().scale(outputs)

    monkeypatch.setattr(torch.amp, "GradScaler", RecordingScaler)

    def scaled_by(factor):  # the LM loss times `factor`: gradients `factor` times as large
        def loss_fn(model, batch):
            loss, n, correct = lm_loss(model, batch)
            return loss * factor, n, correct
        return loss_fn

    def new_model():
        torch.manual_seed(0)
        return build_scratch("nano", 20, Framing(1, 2, 0, True), n_positions=16)

    def trainer(model, run_dir, factor, steps, logs=None):
        # weight_decay 0: weights only move when gradients are non-zero
        cfg = TrainSection(precision="fp32", max_steps=steps, batch_size=4, save_every=2, keep_checkpoints=10,
                           lr=1e-2, weight_decay=0.0, seed=3)
        run_dir.mkdir(exist_ok=True)
        t = Trainer(model, Data(seqs, seqs[:4], 0), cfg, run_dir, loss_fn=scaled_by(factor), progress=False,
                    log=(logs.append if logs is not None else lambda m: None))
        t.dtype = torch.float16
        return t

    # 1) gradients 1e-7 times the usual size underflow to zero in fp16 without a scale ...
    tiny = 1e-7
    model = new_model()
    batch = Data(seqs, seqs[:4], 0).collate(seqs[:4])
    with torch.autocast("cpu", dtype=torch.float16):
        loss, _, _ = scaled_by(tiny)(model, batch)
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())  # the premise: all zero
    model.zero_grad(set_to_none=True)
    # ... and with the loop's loss scaling they still train every weight
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    res = trainer(model, tmp_path / "tiny", tiny, 6).fit()
    assert res.final_eval["loss"] < res.first_eval["loss"]
    unchanged = [k for k, v in model.named_parameters() if torch.equal(v.detach(), before[k])]
    assert not unchanged, unchanged
    assert RecordingScaler.made and RecordingScaler.made[-1].first_scale == default_scale

    # 2) large gradients overflow at the default scale: the scaler backs off in the first steps
    big = 10.0
    full = new_model()
    trainer(full, tmp_path / "full", big, 8).fit()
    cks = tmp_path / "full" / "checkpoints"
    saved = {s: json.loads((cks / f"step-{s}" / "state.json").read_text())["grad_scaler"] for s in (2, 4, 6, 8)}
    assert saved[4]["scale"] < default_scale  # the loss really was scaled, and the scale adapted

    # 3) the run cut after step 4 (later checkpoints gone) resumes with step 4's scale
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    for s in (6, 8):
        shutil.rmtree(tmp_path / "cut" / "checkpoints" / f"step-{s}")
    logs = []
    resumed = new_model()
    t = trainer(resumed, tmp_path / "cut", big, 8, logs)
    RecordingScaler.made.clear()
    res = t.fit(resume=True)
    assert res.steps == 8
    assert any("step-4 (step 4 of 8)" in m for m in logs), logs
    assert len(RecordingScaler.made) == 1
    assert RecordingScaler.made[0].first_scale == saved[4]["scale"] != default_scale
    # the scaler goes on exactly as in the uninterrupted run: same scale, same weights
    again = json.loads((tmp_path / "cut" / "checkpoints" / "step-8" / "state.json").read_text())["grad_scaler"]
    assert again == saved[8]
    a, b = dict(full.named_parameters()), dict(resumed.named_parameters())
    assert all(torch.equal(a[k], b[k]) for k in a)
