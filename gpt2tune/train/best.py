"""The best evaluation so far: early stopping (`train.early_stopping`) and the best model
(`train.keep_best`).

`Watch` follows one validation metric over the evaluations of a run: whether the newest is an
improvement (by more than `min_delta`), where the best was, and how many evaluations have gone by
without one (`patience`). Its state is plain JSON, saved in every checkpoint, so `--resume`
continues the count. The best weights themselves are written by `train.checkpoint.save_best`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from gpt2tune.errors import UserError

LOWER_IS_BETTER = ("loss", "perplexity")
HIGHER_IS_BETTER = ("accuracy", "macro_f1", "reward_accuracy", "reward_margin")


def resolve_mode(metric: str, mode: str) -> str:
    if mode in ("min", "max"):
        return mode
    if metric in LOWER_IS_BETTER:
        return "min"
    if metric in HIGHER_IS_BETTER:
        return "max"
    raise UserError(f"train.early_stopping.mode: set min or max for metric {metric!r} (auto knows "
                    f"{', '.join(LOWER_IS_BETTER + HIGHER_IS_BETTER)})")


@dataclass
class Watch:
    metric: str
    mode: str  # "min" or "max"
    min_delta: float = 0.0
    patience: Optional[int] = None  # None: never stops the run (keep_best alone)
    best: Optional[float] = None
    best_step: Optional[int] = None
    bad: int = 0  # evaluations since the best

    @classmethod
    def from_config(cls, cfg) -> Optional["Watch"]:
        """The watch a train section asks for, or None."""
        es = getattr(cfg, "early_stopping", None)
        if es is not None:
            return cls(es.metric, resolve_mode(es.metric, es.mode), es.min_delta, es.patience)
        if getattr(cfg, "keep_best", False):
            return cls("loss", "min")
        return None

    def value(self, ev: dict) -> float:
        if self.metric not in ev:
            known = ", ".join(k for k in ev if k != "tokens")
            raise UserError(f"train.early_stopping.metric {self.metric!r} is not evaluated by this task; "
                            f"it evaluates {known}")
        return float(ev[self.metric])

    def update(self, ev: dict, step: int) -> bool:
        """Take one evaluation; whether it is the new best."""
        v = self.value(ev)
        if self.best is None:
            better = v == v  # the first finite-or-not value; nan never counts
        elif self.mode == "min":
            better = v < self.best - self.min_delta
        else:
            better = v > self.best + self.min_delta
        if better:
            self.best, self.best_step, self.bad = v, step, 0
        else:
            self.bad += 1
        return better

    @property
    def exhausted(self) -> bool:
        return self.patience is not None and self.bad >= self.patience

    def state(self) -> dict:
        return asdict(self)

    def load(self, state: Optional[dict]) -> None:
        if state and state.get("metric") == self.metric and state.get("mode") == self.mode:
            self.best, self.best_step, self.bad = state["best"], state["best_step"], state["bad"]
