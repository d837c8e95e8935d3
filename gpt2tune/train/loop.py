"""The training loop: plain PyTorch, deterministic batches, exact resume.

`Trainer` knows nothing of recipes or the CLI: it gets a model, token sequences, an
objective and a config object with the attributes of the recipe's `train` section.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from gpt2tune.data.dataset import collate, epoch_batches, lengths_of, num_batches
from gpt2tune.errors import UserError
from gpt2tune.train import checkpoint as ckpt
from gpt2tune.train import distributed as dist
from gpt2tune.train import memory
from gpt2tune.train.best import Watch
from gpt2tune.train.device import autocast, pick_device, pick_precision
from gpt2tune.train.memory import enable_gradient_checkpointing
from gpt2tune.train.objective import count_targets, evaluate, lm_loss
from gpt2tune.train.optim import build_optimizer, build_scheduler, lr_lambda, optimizer_step
from gpt2tune.train.plots import plot_training


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM during training; a checkpoint was saved at the step boundary."""


@dataclass
class Data:
    """What the loop trains on: token rows, how to batch them, and the pad id.

    `train` / `val` are lists of rows, or `TokenStore`s (the memory-mapped corpus cache): batches
    then read their rows from the memory map as they are needed."""

    train: object  # list of rows | TokenStore
    val: object
    pad_id: int
    batching: str = "group"
    block: int = 128
    collate: Callable = None  # rows -> dict of tensors
    rows_per_sample: int = 1  # rows of a batch per sample (preference pairs: 2), for the memory estimate

    def __post_init__(self):
        if self.collate is None:
            pad = self.pad_id
            self.collate = lambda rows: collate(rows, pad)


@dataclass
class Result:
    steps: int  # done (fewer than the recipe's when train.max_minutes cut them)
    final_eval: dict
    first_eval: dict
    tokens: int
    seconds: float
    records: list = field(default_factory=list)
    best: Optional[dict] = None  # train.early_stopping / keep_best: step, metric, mode, value, validation
    stopped_early: bool = False


class Trainer:
    def __init__(self, model, data: Data, cfg, run_dir: Path, loss_fn=lm_loss, log: Callable[[str], None] = None,
                 progress: bool = True, on_record: Optional[Callable[[dict], None]] = None,
                 eval_fn: Optional[Callable] = None):
        self.model = model
        self.on_record = on_record  # called on rank 0 with every row written to metrics.jsonl (trackers)
        self.eval_fn = eval_fn  # (model, batches, to_device, autocast_ctx) -> metrics; default: the loss's
        self.data = data
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.loss_fn = loss_fn
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.sharded = getattr(cfg, "distributed", "ddp") == "fsdp" and dist.world_size() > 1
        if getattr(cfg, "fast", False) and loss_fn is lm_loss:  # train.fast: lean GPT-2 forward, same loss
            from gpt2tune.train.objective import make_fast_loss

            if self.sharded:  # the fast forward reads whole weights; FSDP gathers them in module forwards
                self.log("note: train.fast is off with train.distributed fsdp (the Hugging Face forward runs)")
            else:
                # several processes: gradients through autograd, where DDP's all-reduce hooks see them
                self.loss_fn = make_fast_loss(model, direct_grads=dist.world_size() == 1,
                                              checkpoint=getattr(cfg, "gradient_checkpointing", False)) or lm_loss
        self.progress = progress
        self.device = dist.rank_device(pick_device(cfg.device))
        self.dtype = pick_precision(cfg.precision, self.device)
        if getattr(cfg, "gradient_checkpointing", False):
            enable_gradient_checkpointing(model)  # the Hugging Face forward (the fast one got `checkpoint`)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        if not data.train:
            raise UserError("no training samples left after cleaning and splitting")
        self.world, self.rank = dist.world_size(), dist.rank()
        dist.init(self.device.type)
        self.global_batch = cfg.batch_size * self.world
        per_epoch = num_batches(self._epoch_rows(), self.global_batch)
        self.steps_per_epoch = max(1, per_epoch // cfg.grad_accum)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        self.planned_steps = self.total_steps  # what the recipe asks; a time budget may plan fewer
        self.warmup = cfg.warmup_steps or int(cfg.warmup_ratio * self.total_steps)
        self._batches_cache: dict[int, list] = {}
        self._val: Optional[list] = None  # validation batches, built once
        self._stop_signal: Optional[str] = None  # set by SIGINT / SIGTERM (see `_signals`)
        self.result: Optional[Result] = None  # of the last `fit`

    # -- data -----------------------------------------------------------------
    def _epoch_rows(self) -> int:
        if getattr(self.data.train, "streaming", False):  # data.stream.RowStream: its length is unknown
            if not self.cfg.max_steps:
                raise UserError("data.streaming needs train.max_steps: a stream has no known length, so no epochs")
            return self.global_batch
        if self.data.batching == "pack":
            tokens = int(lengths_of(self.data.train).sum())
            return max(1, math.ceil(tokens / self.data.block))
        return len(self.data.train)

    def _batches(self, epoch: int) -> list:
        if epoch not in self._batches_cache:
            self._batches_cache = {epoch: epoch_batches(self.data.train, self.global_batch, self.data.batching,
                                                        self.cfg.seed, epoch, self.data.block)}
        return self._batches_cache[epoch]

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _val_batches(self):
        """The validation batches: every sample, or with `train.eval_batches` a seeded random subset
        of that many batches' worth (the same at every evaluation; the first batches of the
        length-sorted set would hold only the shortest samples), sorted by length for little padding."""
        if self._val is None:
            val, bs = self.data.val, max(self.cfg.batch_size, 8)
            pick = list(range(len(val)))
            if self.cfg.eval_batches and self.cfg.eval_batches * bs < len(val):
                pick = random.Random(f"val:{self.cfg.seed}").sample(range(len(val)), self.cfg.eval_batches * bs)
                self.log(f"validation: a fixed random subset of {len(pick):,} of {len(val):,} samples "
                         f"(train.eval_batches {self.cfg.eval_batches} x {bs})")
            lengths = lengths_of(val)
            rows = [val[i] for i in sorted(pick, key=lambda i: lengths[i])]  # (stable, as sorted(rows, key=len))
            self._val = [self.data.collate(rows[i : i + bs]) for i in range(0, len(rows), bs)]
        return self._val

    def evaluate(self) -> dict:
        if not self.data.val:
            return {}
        ctx = lambda: autocast(self.device, self.dtype)  # noqa: E731
        if self.eval_fn is not None:
            return self.eval_fn(self.model, self._val_batches(), self._to_device, ctx)
        return evaluate(self.model, self._val_batches(), self._to_device, ctx, self.loss_fn)

    # -- one optimizer step ---------------------------------------------------
    def _window(self, epoch: int, pos: int) -> tuple[list, int, int]:
        """The micro-batches of the next optimizer step, as (this rank's batch, its weight), and the
        epoch / position after them. Each micro-batch's mean loss is weighted by its share of the real
        targets of the whole window on all ranks (DDP then averages over ranks), so k micro-batches x N
        processes give the update of one batch of all their rows. A rank whose share of a batch is
        empty runs a stand-in row with weight 0: every rank must take part in DDP's all-reduce."""
        parts = []
        for _ in range(self.cfg.grad_accum):
            batches = self._batches(epoch)
            if pos >= len(batches):
                epoch, pos = epoch + 1, 0
                batches = self._batches(epoch)
            rows = batches[pos]
            pos += 1
            mine = dist.shard(rows, self.rank, self.world) if self.world > 1 else rows
            batch = self._to_device(self.data.collate(mine or rows[:1]))
            parts.append((batch, count_targets(batch) if mine else 0))
        total = sum(n for _, n in parts)
        if self.world > 1:
            total = dist.sum_all([float(total)])[0]
        scale = self.world / max(total, 1.0)
        return [(b, n * scale) for b, n in parts], epoch, pos

    def _signals(self):
        """SIGINT / SIGTERM (Ctrl-C, schedulers, containers) ask the loop to stop at the next step
        boundary, where it saves a checkpoint: never a half-done step. A second signal stops at once."""
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return contextlib.nullcontext()

        def handler(signum, frame):
            if self._stop_signal is not None:
                raise KeyboardInterrupt
            self._stop_signal = signal.Signals(signum).name

        @contextlib.contextmanager
        def installed():
            old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

        return installed()

    # -- time budget ----------------------------------------------------------
    def _fit_budget(self, step: int, step_seconds: float, elapsed: float, eval_seconds: float) -> Optional[int]:
        """How many steps fit in `train.max_minutes`, measured after the first steps: the remaining
        budget over the measured seconds per step, less the evaluations still to come (each as long as
        the first). None when the planned steps fit."""
        cfg = self.cfg
        left = cfg.max_minutes * 60 - elapsed
        evals = (self.total_steps - step) // cfg.eval_every if cfg.eval_every else 0
        fit = step + int(max(0.0, left - (evals + 1) * eval_seconds) / max(step_seconds, 1e-9))
        return max(step + 1, fit) if fit < self.total_steps else None

    def _check_memory(self, model) -> None:
        """Log the estimated peak memory; stop with advice when the device has less free."""
        cfg = self.cfg
        ckpt_on = getattr(cfg, "gradient_checkpointing", False)
        longest = self.data.block if self.data.batching == "pack" else min(self.data.block, int(lengths_of(self.data.train).max()))
        est = memory.estimate(model, cfg.batch_size * self.data.rows_per_sample, longest, self.dtype, ckpt_on,
                              chunked_loss=getattr(self.loss_fn, "fast", None) is not None,
                              optimizer=getattr(cfg, "optimizer", "adamw"))
        free = memory.free_memory(self.device)
        if self.rank == 0:
            self.log(f"memory: about {est.describe()} at the peak; {free / 2**30:.1f} GiB free on {self.device}")
        if getattr(cfg, "check_memory", True):
            memory.check_fits(est, free, self.device, ckpt_on)

    # -- loop -----------------------------------------------------------------
    def fit(self, resume: bool = False) -> Result:
        with self._signals():
            return self._fit(resume)

    def _fit(self, resume: bool) -> Result:
        cfg = self.cfg
        model = self.model.to(self.device)
        model.train()
        self._check_memory(model)
        torch.manual_seed(cfg.seed + self.rank)  # each rank its own dropout masks
        par = dist.Parallel(model, self.loss_fn, self.device, sharded=self.sharded)  # before the optimizer: FSDP
        opt = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas, self.device,  # replaces the parameters
                              fused=getattr(cfg, "fast", False) and not self.sharded,
                              kind=getattr(cfg, "optimizer", "adamw"))
        sched = build_scheduler(opt, cfg.schedule, self.warmup, self.total_steps)
        # fp16 (GPUs without bf16) needs loss scaling, or small gradients underflow to zero
        scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None
        ck_root = self.run_dir / "checkpoints"
        metrics_path = self.run_dir / "metrics.jsonl"
        step, epoch, pos, tokens_seen, records = 0, 0, 0, 0, []
        first_eval: dict = {}
        watch = Watch.from_config(cfg)  # early stopping / best model
        if watch is not None:
            what = "train.early_stopping" if cfg.early_stopping is not None else "train.keep_best"
            if not cfg.eval_every:
                raise UserError(f"{what} needs evaluations during training: set train.eval_every")
            if not self.data.val:
                raise UserError(f"{what} needs validation data (data.val_fraction or data.validation)")

        if resume:
            last = ckpt.latest_checkpoint(ck_root)
            if last is None:
                raise UserError(f"--resume: no checkpoint in {ck_root}")
            st = ckpt.load_checkpoint(last, model, opt, sched, self.rank, sharded=self.sharded)
            step, epoch, pos, tokens_seen = st["step"], st["epoch"], st["pos"], st["tokens"]
            records, first_eval = st["metrics"], st.get("first_eval", {})
            if getattr(self.data.train, "streaming", False):
                self.data.train.load_state_dict(st.get("stream"))  # the stream goes on where it was
            if watch is not None:
                watch.load(st.get("best_watch"))  # the patience count and the best so far go on
            if scaler is not None and st.get("grad_scaler"):
                scaler.load_state_dict(st["grad_scaler"])
            if st.get("planned_steps", st.get("total_steps")) != self.planned_steps:
                raise UserError(f"--resume: the checkpoint was made for {st.get('planned_steps', st.get('total_steps'))} "
                                f"steps, this recipe asks for {self.planned_steps}; resume with the same recipe")
            if st["total_steps"] != self.total_steps:  # a time budget had planned fewer steps: keep its schedule
                self.total_steps = st["total_steps"]
                sched.lr_lambdas[0] = lr_lambda(cfg.schedule, self.warmup, self.total_steps)
            self.log(f"resumed from {last} (step {step} of {self.total_steps})")
        main = self.rank == 0
        if main:
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        mfile = open(metrics_path, "a", encoding="utf-8") if main else None

        def emit(rec: dict) -> None:
            records.append(rec)
            if mfile is not None:
                mfile.write(json.dumps(rec) + "\n")
                mfile.flush()
                if self.on_record is not None:
                    self.on_record(rec)

        def save() -> None:
            rngs = dist.gather_states(ckpt.rng_states()) if self.world > 1 else None
            full = ckpt.full_states(model, opt) if self.sharded else None  # every rank takes part in the gather
            if main:
                ckpt.save_checkpoint(ck_root, step, model, opt, sched, state(), cfg.keep_checkpoints, rngs, full)
                if cfg.keep_best and watch is not None:  # older bests: no resume from here needs them
                    ckpt.prune_best(ck_root, watch.best_step)
            dist.barrier()

        def watch_eval(ev: dict) -> bool:
            """Take a validation row: snapshot a new best (keep_best); whether patience ran out.
            Every rank takes rank 0's decisions."""
            improved = watch.update(ev, step)
            flags = [float(improved), float(watch.exhausted)]
            if self.world > 1:
                flags = dist.sum_all([f if main else 0.0 for f in flags])
            if flags[0] and cfg.keep_best:
                weights = ckpt.full_states(model, opt)[0] if self.sharded else ckpt.trainable_state(model)
                if main:
                    ckpt.save_best(ck_root, step, weights, {"metric": watch.metric, "value": watch.best})
                dist.barrier()
            return bool(flags[1])

        def state() -> dict:
            return {"epoch": epoch, "pos": pos, "tokens": tokens_seen, "metrics": records,
                    "first_eval": first_eval, "total_steps": self.total_steps, "planned_steps": self.planned_steps,
                    "grad_scaler": scaler.state_dict() if scaler is not None else None,
                    "best_watch": watch.state() if watch is not None else None,
                    "stream": self.data.train.state_dict() if getattr(self.data.train, "streaming", False) else None}

        t_fit = time.perf_counter()
        if step == 0:
            first_eval = self.evaluate()
            if first_eval:
                emit({"step": 0, "split": "validation", **first_eval})
        eval_seconds = time.perf_counter() - t_fit  # 0 on resume: no evaluation measured

        # what the optimizer updates (FSDP registers other, unsharded tensors on the module after a forward)
        trainable = [p for g in opt.param_groups for p in g["params"]]
        skipped_steps = 0
        bar = tqdm(total=self.total_steps, initial=step, disable=not (self.progress and main), unit="step",
                   dynamic_ncols=True, file=sys.stderr, mininterval=0.5)
        win_loss = win_n = win_correct = win_tokens = 0.0
        win_t0 = time.perf_counter()
        t_start = time.perf_counter()
        last_saved = step
        stop = stopped_early = False
        last_eval: tuple = (None, {})  # (step, row) of the newest evaluation during training
        # time budget: measure the speed over the first steps of this process, then plan what fits
        budget = cfg.max_minutes * 60 if cfg.max_minutes else None
        n_measure = min(20, max(2, self.total_steps // 20))
        measure_at, t_measure = step + n_measure, time.perf_counter()  # wall time per step, logging included
        try:
            while step < self.total_steps:
                window, epoch, pos = self._window(epoch, pos)
                bad_loss = None
                for i, (batch, weight) in enumerate(window):
                    with par.sync(last=i == len(window) - 1):
                        with autocast(self.device, self.dtype):
                            loss, n, correct = par.loss(batch)
                        part = loss * weight
                        (scaler.scale(part) if scaler is not None else part).backward()
                    if not torch.isfinite(loss.detach()):  # every rank still ran its backward: no one waits
                        bad_loss = float(loss.detach())
                        continue
                    if weight:
                        win_loss += float(loss.detach()) * n
                        win_n += n
                        win_correct += int(correct)
                        win_tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else n
                bad, stop = bad_loss is not None, self._stop_signal is not None
                if self.world > 1:  # every rank takes the same decision
                    bad, stop = (bool(v) for v in dist.sum_all([float(bad), float(stop)]))
                if bad and cfg.on_nonfinite == "stop":
                    raise UserError(
                        f"loss became {bad_loss if bad_loss is not None else 'non-finite'} at step {step + 1}; "
                        f"stopped. The last good checkpoint is kept in {ck_root} (lower train.lr, use precision "
                        f"fp32, or set train.on_nonfinite: skip)")
                if bad:  # on_nonfinite: skip -> drop this update, keep going
                    skipped_steps += 1
                    self.log(f"warning: non-finite loss at step {step + 1}; update skipped")
                else:
                    optimizer_step(opt, trainable, cfg.grad_clip, scaler)
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                bar.update(1)
                if budget is not None and step >= measure_at and step < self.total_steps:
                    # re-planned at every step from the mean speed so far: the schedule ends where the run does
                    now = time.perf_counter()
                    step_seconds = (now - t_measure) / (step - measure_at + n_measure)
                    fit = step if now - t_fit > budget else self._fit_budget(step, step_seconds, now - t_fit, eval_seconds)
                    if self.world > 1:  # every rank plans the same number of steps (rank 0's)
                        fit = int(dist.sum_all([float(fit or 0) if main else 0.0])[0]) or None
                    if fit is not None and fit < self.total_steps:
                        if self.total_steps == self.planned_steps:
                            self.log(f"time budget {cfg.max_minutes:g} min: {fit} of {self.total_steps} steps fit "
                                     f"({step_seconds:.3f} s/step); the {cfg.schedule} schedule now ends there")
                        elif fit == step:
                            self.log(f"time budget {cfg.max_minutes:g} min spent at step {step}")
                        self.total_steps = fit
                        sched.lr_lambdas[0] = lr_lambda(cfg.schedule, self.warmup, fit)
                        bar.total = fit
                        bar.refresh()

                if step % cfg.log_every == 0 or step == self.total_steps:
                    dt = time.perf_counter() - win_t0
                    if self.world > 1:
                        win_loss, win_n, win_correct, win_tokens = dist.sum_all([win_loss, win_n, win_correct, win_tokens])
                    tokens_seen += int(win_tokens)
                    rec = {"step": step, "split": "train", "epoch": round(epoch + pos / max(1, len(self._batches(epoch))), 4),
                           "loss": win_loss / max(win_n, 1), "accuracy": win_correct / max(win_n, 1),
                           "lr": sched.get_last_lr()[0], "tokens_per_s": win_tokens / max(dt, 1e-9),
                           "tokens": tokens_seen}
                    emit(rec)
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
                    win_loss = win_n = win_correct = win_tokens = 0.0
                    win_t0 = time.perf_counter()
                if stop:
                    break
                if cfg.eval_every and step % cfg.eval_every == 0 and step != self.total_steps:
                    ev = self.evaluate()
                    if ev:
                        emit({"step": step, "split": "validation", **ev})
                        last_eval = (step, ev)
                        if watch is not None and watch_eval(ev):
                            stopped_early = True
                            self.log(f"early stopping at step {step}: validation {watch.metric} has not improved "
                                     f"by more than {watch.min_delta:g} for {watch.patience} evaluations "
                                     f"(best {watch.best:.4g} at step {watch.best_step})")
                if cfg.save_every and step % cfg.save_every == 0:
                    save()
                    last_saved = step
                if stopped_early:
                    break
            if stop:
                if step > last_saved:
                    save()
                raise TrainingInterrupted(f"interrupted at step {step} ({self._stop_signal or 'signal on another rank'}); "
                                          f"checkpoint saved in {ck_root}; continue with --resume")
        except BaseException:
            bar.close()
            if mfile is not None:
                mfile.close()
            raise
        bar.close()
        if last_eval[0] == step:  # early stopping has just evaluated this very model
            final = last_eval[1]
        else:
            final = self.evaluate()
            if final:
                emit({"step": step, "split": "validation", **final})
                if watch is not None:
                    watch.update(final, step)  # the last model may be the best: then no snapshot is needed
        best = None
        if watch is not None and watch.best_step is not None:
            row = next((r for r in records if r["split"] == "validation" and r["step"] == watch.best_step), {})
            best = {"step": watch.best_step, "metric": watch.metric, "mode": watch.mode, "value": watch.best,
                    "validation": {k: v for k, v in row.items() if k not in ("step", "split")}}
            if cfg.keep_best and main:
                ckpt.prune_best(ck_root, watch.best_step, only=True)
        if self.sharded:  # what the run saves: a plain model holding the gathered weights
            self.model = par.gathered_model()
        if mfile is not None:
            mfile.close()
        seconds = time.perf_counter() - t_start
        if main:
            plot_training(records, self.run_dir / "plots")
        self.result = Result(step, final, first_eval, tokens_seen, seconds, records, best, stopped_early)
        return self.result

    def restore_best(self, model) -> Optional[int]:
        """Load the best evaluation's weights (train.keep_best) into `model` (the trained model, or
        its plain copy); the best step, or None when the last model is the best."""
        best = self.result.best if self.result is not None else None
        if not (self.cfg.keep_best and best) or best["step"] == self.result.steps:
            return None
        ckpt.load_best(self.run_dir / "checkpoints", best["step"], model)
        return best["step"]
