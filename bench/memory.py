"""Peak training memory and speed with and without gradient checkpointing (`train.gradient_checkpointing`),
on the Hugging Face forward and on `train.fast`, each side alone in a fresh process, beside the
estimate gpt2tune prints before training (`gpt2tune.train.memory.estimate`).

    .venv/bin/python bench/memory.py                          # GPT-2 124M, batch 8 x 512, fp32: ~10 min on 2 cores
    .venv/bin/python bench/memory.py --size large --batch 1   # GPT-2 774M
    .venv/bin/python bench/memory.py --size mini --batch 2 --seq 128   # a smoke run
    .venv/bin/python bench/memory.py --sides fast --batch 1 --seq 256 --steps 3 \
        --optimizer adamw,adamw_bf16,adamw_8bit       # train.optimizer: each side with each optimizer

Each side builds the model (random weights: memory and speed do not depend on them), makes an AdamW,
and runs `--steps` full fine-tuning steps on the same batch. Reported: the process's peak resident
set (VmHWM), the part of it above the model's weights ("training"), seconds per step (the first
step excluded when there are several), and the loss of the first step (equal with and without
checkpointing: it only changes what is kept, not what is computed). With `--optimizer`, each side
runs once per listed `train.optimizer`, its optimizer made as training makes it (`build_optimizer`:
weight decay 0.01 on matrices, foreach AdamW on the HF forward, fused on train.fast), and the
optimizer step's own seconds are reported too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {"mini": (4, 4, 256), "small": (12, 12, 768), "medium": (24, 16, 1024), "large": (36, 20, 1280)}


def vm(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field))
    return int(line.split()[1]) * 1024


def probe(a) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2tune.train.memory import enable_gradient_checkpointing, estimate
    from gpt2tune.train.objective import lm_loss, make_fast_loss

    torch.manual_seed(0)
    L, H, D = SIZES[a.size]
    m = GPT2LMHeadModel._from_config(GPT2Config(n_layer=L, n_head=H, n_embd=D), attn_implementation="sdpa").train()
    ckpt = a.side.endswith("+ckpt")
    if a.side.startswith("fast"):
        loss_fn = make_fast_loss(m, checkpoint=ckpt)
    else:
        loss_fn = lm_loss
        if ckpt:
            enable_gradient_checkpointing(m)
    if a.optimizer:
        from gpt2tune.train.optim import build_optimizer

        opt = build_optimizer(m, 1e-4, 0.01, (0.9, 0.999), torch.device("cpu"), fused=a.side.startswith("fast"),
                              kind=a.optimizer)
    else:
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=a.side.startswith("fast"))
    ids = torch.randint(0, m.config.vocab_size, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    est = estimate(m, a.batch, a.seq, torch.float32, ckpt, chunked_loss=a.side.startswith("fast"),
                   optimizer=a.optimizer or "adamw")
    base = vm("VmRSS")
    times, opt_times, losses = [], [], []
    for _ in range(a.steps):
        t = time.perf_counter()
        loss = loss_fn(m, batch)[0]
        loss.backward()
        t_opt = time.perf_counter()
        opt.step()
        opt_times.append(time.perf_counter() - t_opt)
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))
    timed, opt_timed = times[1:] or times, opt_times[1:] or opt_times
    return {"side": a.side, "peak": vm("VmHWM"), "weights_rss": base, "step_s": sum(timed) / len(timed),
            "opt_s": sum(opt_timed) / len(opt_timed), "loss": losses[0], "estimate": est.total,
            "estimate_optimizer": est.optimizer}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=list(SIZES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--sides", default="hf,hf+ckpt,fast,fast+ckpt")
    ap.add_argument("--optimizer", default="", help="comma-separated train.optimizer values: each side runs with "
                                                     "each (adamw, adamw_bf16, adamw_8bit)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--side", help=argparse.SUPPRESS)  # child process: one side
    a = ap.parse_args()
    if a.side and "/" in a.side:  # child process of an --optimizer run: SIDE/OPTIMIZER
        a.side, a.optimizer = a.side.split("/")
    if a.side:
        print(json.dumps(probe(a)))
        return
    cpu = next((x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                if x.startswith("model name")), "?")
    print(f"GPT-2 {a.size}, batch {a.batch} x {a.seq}, fp32, {a.steps} steps per side; {cpu}, "
          f"{torch.get_num_threads()} threads")
    res = {}
    sides = [f"{s}/{o}" for s in a.sides.split(",") for o in a.optimizer.split(",")] if a.optimizer else a.sides.split(",")
    for side in sides:
        cmd = [sys.executable, __file__, "--side", side, "--size", a.size, "--batch", str(a.batch),
               "--seq", str(a.seq), "--steps", str(a.steps)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{side:10s} failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
            continue
        res[side] = json.loads(r.stdout.strip().splitlines()[-1])
    gib = lambda b: b / 2**30  # noqa: E731
    if a.optimizer:
        print(f"{'side':22s} {'peak GiB':>9s} {'training GiB':>13s} {'estimate GiB':>13s} {'(optimizer)':>12s} "
              f"{'s/step':>8s} {'opt s/step':>11s} {'loss':>10s}")
        for side, r in res.items():
            print(f"{side:22s} {gib(r['peak']):9.2f} {gib(r['peak'] - r['weights_rss']):13.2f} {gib(r['estimate']):13.2f} "
                  f"{gib(r['estimate_optimizer']):12.2f} {r['step_s']:8.2f} {r['opt_s']:11.3f} {r['loss']:10.5f}")
        for side, r in res.items():
            ref = res.get(side.split("/")[0] + "/adamw")
            if ref and r is not ref:
                print(f"{side}: peak {gib(r['peak'] - ref['peak']):+.2f} GiB vs adamw, step time x{r['step_s'] / ref['step_s']:.2f}, "
                      f"optimizer step x{r['opt_s'] / ref['opt_s']:.1f}")
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=2))
        return
    print(f"{'side':10s} {'peak GiB':>9s} {'training GiB':>13s} {'estimate GiB':>13s} {'s/step':>8s} {'loss':>10s}")
    for side, r in res.items():
        print(f"{side:10s} {gib(r['peak']):9.2f} {gib(r['peak'] - r['weights_rss']):13.2f} {gib(r['estimate']):13.2f} "
              f"{r['step_s']:8.2f} {r['loss']:10.5f}")
    for path in ("hf", "fast"):
        off, on = res.get(path), res.get(path + "+ckpt")
        if off and on:
            print(f"{path}: checkpointing cuts the peak by {100 * (1 - on['peak'] / off['peak']):.0f}% "
                  f"(training part by {100 * (1 - (on['peak'] - on['weights_rss']) / (off['peak'] - off['weights_rss'])):.0f}%), "
                  f"step time x{on['step_s'] / off['step_s']:.2f}, loss difference {abs(on['loss'] - off['loss']):.2e}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
