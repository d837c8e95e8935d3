"""The training loop: plain PyTorch, deterministic batches, exact resume.

`Trainer` knows nothing of recipes or the CLI: it gets a model, token sequences, an
objective and a config object with the attributes of the recipe's `train` section.

`fit()`: `_setup` (the model on its device, the engine that runs it, optimizer, schedule, loss
scaler), `_restore` on resume (a `TrainState` and the checkpoint's tensors), then `_steps`: per
optimizer step `_next_rows` (the micro-batches and their weights), `_accumulate` (forward and
backward), `optim.optimizer_step` (unscale, clip, step), then as the recipe asks a train row
(`_log_window`), an evaluation (`_evaluate_during`, early stopping) and a checkpoint (`_save`).
Rows go to RUN/metrics.jsonl and to the `train.loggers` the Trainer is given.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from gpt2tune.data.dataset import collate, epoch_batches, lengths_of, num_batches
from gpt2tune.errors import UserError
from gpt2tune.train import checkpoint as ckpt
from gpt2tune.train import distributed as dist
from gpt2tune.train import memory
from gpt2tune.train.best import Watch
from gpt2tune.train.device import autocast, pick_device, pick_precision
from gpt2tune.train.loggers import Logger, MetricsFile
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


@dataclass
class TrainState:
    """Where a run is: what a checkpoint keeps besides the model, optimizer and schedule."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    pos: int = 0  # the next batch of the epoch
    tokens: int = 0  # real (not padding) tokens trained on
    records: list = field(default_factory=list)  # every row logged (metrics.jsonl)
    first_eval: dict = field(default_factory=dict)  # validation before training


@dataclass
class _Window:
    """Sums over the steps since the last train row."""

    loss: float = 0.0  # sum of the mean losses x their targets
    n: float = 0.0  # targets
    correct: float = 0.0
    tokens: float = 0.0
    t0: float = field(default_factory=time.perf_counter)

    def add(self, loss: float, n, correct: int, tokens: int) -> None:
        self.loss += loss * n
        self.n += n
        self.correct += correct
        self.tokens += tokens

    def sums(self) -> list:
        return [self.loss, self.n, self.correct, self.tokens]

    def reset(self) -> None:
        self.loss = self.n = self.correct = self.tokens = 0.0
        self.t0 = time.perf_counter()


class _Clock:
    """The time of one `fit`: since it started, the first evaluation's length, and the wall time per
    step over this process's steps after the first few (what train.max_minutes plans with)."""

    def __init__(self, max_minutes: Optional[float], step: int, total_steps: int):
        self.budget = max_minutes * 60 if max_minutes else None
        self.t_fit = self.t_train = time.perf_counter()
        self.eval_seconds = 0.0  # stays 0 on resume: no evaluation measured
        self.n_measure = min(20, max(2, total_steps // 20))
        self.measure_at = step + self.n_measure

    def evaluated(self) -> None:
        """The first evaluation is over: training starts."""
        self.t_train = time.perf_counter()
        self.eval_seconds = self.t_train - self.t_fit

    def step_seconds(self, step: int, now: float) -> float:
        return (now - self.t_train) / (step - self.measure_at + self.n_measure)

    def seconds(self) -> float:
        """Of training, since the first evaluation."""
        return time.perf_counter() - self.t_train


class Trainer:
    def __init__(self, model, data: Data, cfg, run_dir: Path, loss_fn=lm_loss, log: Callable[[str], None] = None,
                 progress: bool = True, loggers: Sequence[Logger] = (), eval_fn: Optional[Callable] = None):
        self.model = model
        # rank 0 logs every row to RUN/metrics.jsonl and to these (train.report_to's trackers), which
        # their owner closes: a run's trackers outlive one Trainer
        self.loggers = list(loggers)
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
        self.main = self.rank == 0
        self.ck_root = self.run_dir / "checkpoints"

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
    def _next_rows(self) -> list:
        """The micro-batches of the next optimizer step, as (this rank's batch, its weight); the state's
        epoch and position move past them. Each micro-batch's mean loss is weighted by its share of the real
        targets of the whole window on all ranks (DDP then averages over ranks), so k micro-batches x N
        processes give the update of one batch of all their rows. A rank whose share of a batch is
        empty runs a stand-in row with weight 0: every rank must take part in DDP's all-reduce."""
        s = self.state
        epoch, pos = s.epoch, s.pos
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
        s.epoch, s.pos = epoch, pos
        return [(b, n * scale) for b, n in parts]

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
        if self.main:
            self.log(f"memory: about {est.describe()} at the peak; {free / 2**30:.1f} GiB free on {self.device}")
        if getattr(cfg, "check_memory", True):
            memory.check_fits(est, free, self.device, ckpt_on)

    # -- the run ---------------------------------------------------------------
    def fit(self, resume: bool = False) -> Result:
        with self._signals():
            return self._fit(resume)

    def _fit(self, resume: bool) -> Result:
        self._setup()
        s = self.state = self._restore() if resume else TrainState()
        self._files = [MetricsFile(self.run_dir / "metrics.jsonl", s.records)] if self.main else []
        self._bar = tqdm(total=self.total_steps, initial=s.step, disable=not (self.progress and self.main),
                         unit="step", dynamic_ncols=True, file=sys.stderr, mininterval=0.5)
        self._last_eval: tuple = (None, {})  # (step, row) of the newest evaluation during training
        clock = _Clock(self.cfg.max_minutes, s.step, self.total_steps)
        try:
            if s.step == 0:  # the baseline every later evaluation is compared with
                s.first_eval = self.evaluate()
                if s.first_eval:
                    self._record(0, "validation", s.first_eval)
            clock.evaluated()
            stopped_early = self._steps(clock)
            self._bar.close()
            final, best = self._finish()
        finally:
            self._bar.close()
            for f in self._files:
                f.close()
        seconds = clock.seconds()
        if self.sharded:  # what the run saves: a plain model holding the gathered weights
            self.model = self._par.gathered_model()
        if self.main:
            plot_training(s.records, self.run_dir / "plots")
        self.result = Result(s.step, final, s.first_eval, s.tokens, seconds, s.records, best, stopped_early)
        return self.result

    def _steps(self, clock: "_Clock") -> bool:
        """Optimizer steps until the last one, early stopping (returns True) or a signal (saves a
        checkpoint and raises TrainingInterrupted)."""
        cfg, s, win = self.cfg, self.state, _Window()
        last_saved = s.step
        while s.step < self.total_steps:
            bad_loss = self._accumulate(self._next_rows(), win)  # forward + backward of every micro-batch
            bad, stop = self._agree(bad_loss is not None, self._stop_signal is not None)
            if bad:  # train.on_nonfinite: stop raises, skip drops this update
                self._nonfinite(bad_loss)
            else:
                optimizer_step(self._opt, self._trainable, cfg.grad_clip, self._scaler)  # unscale, clip, step
            self._sched.step()
            self._opt.zero_grad(set_to_none=True)
            s.step += 1
            self._bar.update(1)
            if clock.budget is not None:  # train.max_minutes: the schedule ends where the time does
                self._replan(clock)
            if s.step % cfg.log_every == 0 or s.step == self.total_steps:
                self._log_window(win)
            if stop:  # Ctrl-C / SIGTERM on some rank: a checkpoint at this step boundary, then out
                if s.step > last_saved:
                    self._save()
                raise TrainingInterrupted(f"interrupted at step {s.step} ({self._stop_signal or 'signal on another rank'}); "
                                          f"checkpoint saved in {self.ck_root}; continue with --resume")
            stopped_early = bool(cfg.eval_every and s.step % cfg.eval_every == 0 and s.step != self.total_steps
                                 and self._evaluate_during())
            if cfg.save_every and s.step % cfg.save_every == 0:
                self._save()
                last_saved = s.step
            if stopped_early:
                return True
        return False

    def _setup(self) -> None:
        """The model on its device, the engine that runs it (one process, DDP or FSDP), the optimizer,
        the schedule, the loss scaler (enabled in fp16 only) and the early-stopping watch."""
        cfg = self.cfg
        model = self.model.to(self.device)
        model.train()
        self._check_memory(model)
        torch.manual_seed(cfg.seed + self.rank)  # each rank its own dropout masks
        self._par = dist.Parallel(model, self.loss_fn, self.device, sharded=self.sharded)  # before the optimizer: FSDP
        self._opt = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas, self.device,  # replaces the parameters
                                    fused=getattr(cfg, "fast", False) and not self.sharded,
                                    kind=getattr(cfg, "optimizer", "adamw"))
        # what the optimizer updates (FSDP registers other, unsharded tensors on the module after a forward)
        self._trainable = [p for g in self._opt.param_groups for p in g["params"]]
        self._sched = build_scheduler(self._opt, cfg.schedule, self.warmup, self.total_steps)
        # fp16 (GPUs without bf16) needs loss scaling, or small gradients underflow to zero; else a no-op
        self._scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self._watch = Watch.from_config(cfg)  # early stopping / best model
        if self._watch is not None:
            what = "train.early_stopping" if cfg.early_stopping is not None else "train.keep_best"
            if not cfg.eval_every:
                raise UserError(f"{what} needs evaluations during training: set train.eval_every")
            if not self.data.val:
                raise UserError(f"{what} needs validation data (data.val_fraction or data.validation)")

    def _restore(self) -> TrainState:
        """The newest checkpoint into the model, optimizer, schedule, scaler, watch and data stream."""
        cfg = self.cfg
        last = ckpt.latest_checkpoint(self.ck_root)
        if last is None:
            raise UserError(f"--resume: no checkpoint in {self.ck_root}")
        st = ckpt.load_checkpoint(last, self.model, self._opt, self._sched, self.rank, sharded=self.sharded)
        planned = st.get("planned_steps", st.get("total_steps"))
        if planned != self.planned_steps:
            raise UserError(f"--resume: the checkpoint was made for {planned} steps, this recipe asks for "
                            f"{self.planned_steps}; resume with the same recipe")
        if getattr(self.data.train, "streaming", False):
            self.data.train.load_state_dict(st.get("stream"))  # the stream goes on where it was
        if self._watch is not None:
            self._watch.load(st.get("best_watch"))  # the patience count and the best so far go on
        if self._scaler.is_enabled() and st.get("grad_scaler"):
            self._scaler.load_state_dict(st["grad_scaler"])
        if st["total_steps"] != self.total_steps:  # a time budget had planned fewer steps: keep its schedule
            self.total_steps = st["total_steps"]
            self._sched.lr_lambdas[0] = lr_lambda(cfg.schedule, self.warmup, self.total_steps)
        self.log(f"resumed from {last} (step {st['step']} of {self.total_steps})")
        return TrainState(st["step"], st["epoch"], st["pos"], st["tokens"], st["metrics"], st.get("first_eval", {}))

    def _checkpoint_state(self) -> dict:
        s = self.state
        return {"epoch": s.epoch, "pos": s.pos, "tokens": s.tokens, "metrics": s.records,
                "first_eval": s.first_eval, "total_steps": self.total_steps, "planned_steps": self.planned_steps,
                "grad_scaler": self._scaler.state_dict() if self._scaler.is_enabled() else None,
                "best_watch": self._watch.state() if self._watch is not None else None,
                "stream": self.data.train.state_dict() if getattr(self.data.train, "streaming", False) else None}

    def _record(self, step: int, split: str, metrics: dict) -> None:
        """One row: kept for the checkpoint and the result; on rank 0 to metrics.jsonl and the loggers."""
        self.state.records.append({"step": step, "split": split, **metrics})
        if self.main:
            for logger in self._files + self.loggers:
                logger.log(step, split, metrics)

    def _agree(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag true on any rank: every rank takes the same decision."""
        if self.world == 1:
            return flags
        return tuple(bool(v) for v in dist.sum_all([float(f) for f in flags]))

    # -- one optimizer step ---------------------------------------------------
    def _accumulate(self, window: list, win: "_Window") -> Optional[float]:
        """Forward and backward of each (micro-batch, weight); the gradients add up. The loss when one
        was not finite (every rank still ran its backward, so no rank waits in DDP's all-reduce)."""
        bad_loss = None
        for i, (batch, weight) in enumerate(window):
            with self._par.sync(last=i == len(window) - 1):  # DDP all-reduces on the last one only
                with autocast(self.device, self.dtype):
                    loss, n, correct = self._par.loss(batch)
                self._scaler.scale(loss * weight).backward()
            if not torch.isfinite(loss.detach()):
                bad_loss = float(loss.detach())
            elif weight:
                win.add(float(loss.detach()), n, int(correct),
                        int(batch["attention_mask"].sum()) if "attention_mask" in batch else n)
        return bad_loss

    def _nonfinite(self, bad_loss: Optional[float]) -> None:
        step = self.state.step
        if self.cfg.on_nonfinite == "stop":
            raise UserError(
                f"loss became {bad_loss if bad_loss is not None else 'non-finite'} at step {step + 1}; "
                f"stopped. The last good checkpoint is kept in {self.ck_root} (lower train.lr, use precision "
                f"fp32, or set train.on_nonfinite: skip)")
        self.log(f"warning: non-finite loss at step {step + 1}; update skipped")

    # -- between steps ----------------------------------------------------------
    def _log_window(self, win: "_Window") -> None:
        """A train row: the mean loss and accuracy over the steps since the last one (all ranks)."""
        s = self.state
        dt = time.perf_counter() - win.t0
        loss, n, correct, tokens = win.sums()
        if self.world > 1:
            loss, n, correct, tokens = dist.sum_all([loss, n, correct, tokens])
        s.tokens += int(tokens)
        row = {"epoch": round(s.epoch + s.pos / max(1, len(self._batches(s.epoch))), 4),
               "loss": loss / max(n, 1), "accuracy": correct / max(n, 1), "lr": self._sched.get_last_lr()[0],
               "tokens_per_s": tokens / max(dt, 1e-9), "tokens": s.tokens}
        self._record(s.step, "train", row)
        self._bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
        win.reset()

    def _evaluate_during(self) -> bool:
        """A validation row during training; whether early stopping ends the run here."""
        ev = self.evaluate()
        if not ev:
            return False
        step, watch = self.state.step, self._watch
        self._record(step, "validation", ev)
        self._last_eval = (step, ev)
        if watch is None or not self._watch_eval(ev):
            return False
        self.log(f"early stopping at step {step}: validation {watch.metric} has not improved by more than "
                 f"{watch.min_delta:g} for {watch.patience} evaluations (best {watch.best:.4g} at step {watch.best_step})")
        return True

    def _watch_eval(self, ev: dict) -> bool:
        """Take a validation row: snapshot a new best (keep_best); whether patience ran out. Every rank
        takes rank 0's decisions."""
        step, watch = self.state.step, self._watch
        improved = watch.update(ev, step)
        flags = [float(improved), float(watch.exhausted)]
        if self.world > 1:
            flags = dist.sum_all([f if self.main else 0.0 for f in flags])
        if flags[0] and self.cfg.keep_best:
            weights = ckpt.full_states(self.model, self._opt)[0] if self.sharded else ckpt.trainable_state(self.model)
            if self.main:
                ckpt.save_best(self.ck_root, step, weights, {"metric": watch.metric, "value": watch.best})
            dist.barrier()
        return bool(flags[1])

    def _save(self) -> None:
        """A checkpoint of this step boundary (every rank takes part in the gathers)."""
        rngs = dist.gather_states(ckpt.rng_states()) if self.world > 1 else None
        full = ckpt.full_states(self.model, self._opt) if self.sharded else None
        if self.main:
            ckpt.save_checkpoint(self.ck_root, self.state.step, self.model, self._opt, self._sched,
                                 self._checkpoint_state(), self.cfg.keep_checkpoints, rngs, full)
            if self.cfg.keep_best and self._watch is not None:  # older bests: no resume from here needs them
                ckpt.prune_best(self.ck_root, self._watch.best_step)
        dist.barrier()

    def _replan(self, clock: "_Clock") -> None:
        """train.max_minutes: from the mean speed so far, how many steps fit; the schedule is shortened
        to end there (re-planned at every step, every rank taking rank 0's plan)."""
        step, cfg = self.state.step, self.cfg
        if step < clock.measure_at or step >= self.total_steps:
            return
        now = time.perf_counter()
        step_seconds = clock.step_seconds(step, now)
        elapsed = now - clock.t_fit
        fit = step if elapsed > clock.budget else self._fit_budget(step, step_seconds, elapsed, clock.eval_seconds)
        if self.world > 1:
            fit = int(dist.sum_all([float(fit or 0) if self.main else 0.0])[0]) or None
        if fit is None or fit >= self.total_steps:
            return
        if self.total_steps == self.planned_steps:
            self.log(f"time budget {cfg.max_minutes:g} min: {fit} of {self.total_steps} steps fit "
                     f"({step_seconds:.3f} s/step); the {cfg.schedule} schedule now ends there")
        elif fit == step:
            self.log(f"time budget {cfg.max_minutes:g} min spent at step {step}")
        self.total_steps = fit
        self._sched.lr_lambdas[0] = lr_lambda(cfg.schedule, self.warmup, fit)
        self._bar.total = fit
        self._bar.refresh()

    def _finish(self) -> tuple[dict, Optional[dict]]:
        """The final validation (unless early stopping has just evaluated this very model) and the best
        evaluation's summary."""
        s, watch = self.state, self._watch
        if self._last_eval[0] == s.step:
            final = self._last_eval[1]
        else:
            final = self.evaluate()
            if final:
                self._record(s.step, "validation", final)
                if watch is not None:
                    watch.update(final, s.step)  # the last model may be the best: then no snapshot is needed
        if watch is None or watch.best_step is None:
            return final, None
        row = next((r for r in s.records if r["split"] == "validation" and r["step"] == watch.best_step), {})
        best = {"step": watch.best_step, "metric": watch.metric, "mode": watch.mode, "value": watch.best,
                "validation": {k: v for k, v in row.items() if k not in ("step", "split")}}
        if self.cfg.keep_best and self.main:
            ckpt.prune_best(self.ck_root, watch.best_step, only=True)
        return final, best

    def restore_best(self, model) -> Optional[int]:
        """Load the best evaluation's weights (train.keep_best) into `model` (the trained model, or
        its plain copy); the best step, or None when the last model is the best."""
        best = self.result.best if self.result is not None else None
        if not (self.cfg.keep_best and best) or best["step"] == self.result.steps:
            return None
        ckpt.load_best(self.run_dir / "checkpoints", best["step"], model)
        return best["step"]
