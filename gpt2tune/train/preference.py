"""Preference objectives: DPO and ORPO, as pure functions of response log-probabilities, and the
loss the Trainer calls on batches of pairs (`data.preference.collate_pairs`: chosen rows, then
rejected rows; labels -100 outside the responses, so prompts and padding never count).

DPO (Rafailov et al. 2023), TRL's `loss_type="sigmoid"`: with summed response log-probs of the policy
(pc, pr) and of the reference model (rc, rr),

    loss = -log σ(β · ((pc - rc) - (pr - rr))),    rewards β·(pc - rc), β·(pr - rr).

ORPO (Hong et al. 2024), as TRL's ORPOTrainer: with mean per-token response log-probs (mc, mr) and
log odds(y) = m - log(1 - exp(m)),

    loss = NLL(chosen) - λ · mean log σ(log odds(c) - log odds(r)),    rewards λ·mc, λ·mr,

NLL the token-mean cross-entropy of the chosen responses over the batch (`nll_on="sequence"`: of the
whole chosen rows, prompt included, as TRL's ORPOTrainer and the paper's code do). ORPO needs no
reference model.

RPO (Pang et al. 2024, TRL's `rpo_alpha`): DPO plus α · NLL of the chosen responses (token mean over
the batch), which keeps the chosen responses likely while the margin grows.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from gpt2tune.data.dataset import IGNORE


# -- losses: pure functions of log-probabilities --------------------------------------------


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the implicit rewards (chosen, rejected), from summed log-probs."""
    chosen_ratio = policy_chosen.float() - ref_chosen.float()
    rejected_ratio = policy_rejected.float() - ref_rejected.float()
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -ln 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_odds_term(mean_chosen: torch.Tensor, mean_rejected: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair: log σ(log odds(chosen) - log odds(rejected)), and that log odds ratio, from mean
    per-token log-probs."""
    mc, mr = mean_chosen.float(), mean_rejected.float()
    log_odds = (mc - mr) - (log1mexp(mc) - log1mexp(mr))
    return F.logsigmoid(log_odds), log_odds


def orpo_loss(nll: torch.Tensor, mean_chosen: torch.Tensor, mean_rejected: torch.Tensor, lam: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch's ORPO loss NLL - λ·mean(log σ(log odds ratio)), and the rewards λ·mean log-probs."""
    ratio, _ = orpo_odds_term(mean_chosen, mean_rejected)
    return nll - lam * ratio.mean(), lam * mean_chosen.detach().float(), lam * mean_rejected.detach().float()


# -- log-probabilities of a batch of pairs --------------------------------------------------


def token_logps(model, batch: dict, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the next-token `labels` [N, T] (-100: not counted) and their mask,
    both [N, T-1]. Prompt-tuning models return longer logits (virtual tokens first): aligned on
    the right, as in `objective.lm_loss`."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, -labels.size(1):-1, :].float()
    target = labels[:, 1:]
    mask = target != IGNORE
    safe = target.masked_fill(~mask, 0)
    lp = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return lp * mask, mask


def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs [2B] (chosen rows, then rejected) and response lengths [2B]."""
    lp, mask = token_logps(model, batch, batch["response_labels"])
    return lp.sum(-1), mask.sum(-1)


@torch.no_grad()
def reference_logps(model, batches, to_device, autocast_ctx=contextlib.nullcontext) -> list[tuple[float, float]]:
    """Summed response log-probs (chosen, rejected) of every pair of `batches`, in order, under
    `model` in eval mode: the reference of DPO computed once before training."""
    was = model.training
    model.eval()
    out: list[tuple[float, float]] = []
    try:
        for b in batches:
            b = to_device(b)
            with autocast_ctx():
                sums, _ = sequence_logps(model, b)
            c, r = sums.float().cpu().chunk(2)
            out += list(zip(c.tolist(), r.tolist()))
    finally:
        model.train(was)
    return out


# -- the loss the Trainer calls ----------------------------------------------------------------


@dataclass
class PreferenceLoss:
    """`loss_fn(model, batch) -> (loss, pairs, pairs whose chosen reward is higher)` for the Trainer,
    and `evaluate` for its validation rows.

    DPO's reference: `batch["ref_logps"]` when computed before training, else `reference(model)`, a
    context under which `model` computes as the reference (an adapter disabled); it runs in eval mode
    (no dropout), as a frozen reference model would."""

    loss: str = "dpo"  # dpo | orpo
    beta: float = 0.1  # DPO's β, ORPO's λ
    reference: Optional[Callable] = None
    nll_on: str = "response"  # ORPO: response | sequence
    rpo_alpha: float = 0.0  # DPO: plus rpo_alpha x the token-mean NLL of the chosen responses (TRL's rpo_alpha)

    def stats(self, model, batch: dict) -> dict:
        if self.loss == "orpo":
            if self.nll_on == "sequence":  # every real token of the rows (TRL's ORPOTrainer)
                labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)
                all_lp, all_mask = token_logps(model, batch, labels)
                resp = batch["response_labels"][:, 1:] != IGNORE
                lp, mask = all_lp * resp, resp
            else:
                lp, mask = token_logps(model, batch, batch["response_labels"])
                all_lp, all_mask = lp, mask
            n = batch["labels"].numel()
            sums, lens = lp.sum(-1), mask.sum(-1)
            means = sums / lens.clamp(min=1)
            nll_sum, nll_count = -all_lp[:n].sum(), all_mask[:n].sum()
            mc, mr = means.chunk(2)
            ratio, log_odds = orpo_odds_term(mc, mr)
            return {"pair_losses": -self.beta * ratio, "nll_sum": nll_sum, "nll_count": nll_count,
                    "chosen_rewards": self.beta * mc.detach(), "rejected_rewards": self.beta * mr.detach(),
                    "logps": sums.detach(), "log_odds": log_odds.detach()}
        lp, mask = token_logps(model, batch, batch["response_labels"])
        sums = lp.sum(-1)
        if "ref_logps" in batch:
            ref = batch["ref_logps"]
        elif self.reference is not None:
            was = model.training
            model.eval()
            try:
                with torch.no_grad(), self.reference(model):
                    ref, _ = sequence_logps(model, batch)
            finally:
                model.train(was)
        else:
            raise RuntimeError("DPO needs reference log-probs: precomputed in the batch, or a reference context")
        pc, pr = sums.chunk(2)
        rc, rr = ref.to(sums.device).chunk(2)
        losses, cr, rj = dpo_loss(pc, pr, rc, rr, self.beta)
        out = {"pair_losses": losses, "chosen_rewards": cr, "rejected_rewards": rj, "logps": sums.detach()}
        if self.rpo_alpha:
            out["nll_sum"], out["nll_count"] = -lp[: len(pc)].sum(), mask[: len(pc)].sum()
        return out

    @property
    def nll_weight(self) -> float:
        """The weight of the chosen responses' NLL in the loss: 1 for ORPO, rpo_alpha for DPO."""
        return 1.0 if self.loss == "orpo" else self.rpo_alpha

    def __call__(self, model, batch: dict):
        s = self.stats(model, batch)
        loss = s["pair_losses"].mean()
        if "nll_sum" in s:
            loss = self.nll_weight * s["nll_sum"] / s["nll_count"].clamp(min=1) + loss
        correct = (s["chosen_rewards"] > s["rejected_rewards"]).sum()
        return loss, s["pair_losses"].numel(), correct

    @torch.no_grad()
    def evaluate(self, model, batches, to_device, autocast_ctx) -> dict:
        """Validation over every pair: loss (per-pair mean; ORPO: plus the token-mean NLL of all chosen
        responses), reward accuracy (chosen reward above rejected), reward margin, mean rewards and
        mean summed log-probs of each side."""
        was = model.training
        model.eval()
        n, pair_loss, nll, nll_n, right, margin, rc, rr, lc, lr_ = 0, 0.0, 0.0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0
        for b in batches:
            b = to_device(b)
            with autocast_ctx():
                s = self.stats(model, b)
            c, r = s["chosen_rewards"].float(), s["rejected_rewards"].float()
            pc, pr = s["logps"].float().chunk(2)
            n += c.numel()
            pair_loss += float(s["pair_losses"].float().sum())
            right += int((c > r).sum())
            margin += float((c - r).sum())
            rc, rr = rc + float(c.sum()), rr + float(r.sum())
            lc, lr_ = lc + float(pc.sum()), lr_ + float(pr.sum())
            if "nll_sum" in s:
                nll += float(s["nll_sum"])
                nll_n += int(s["nll_count"])
        model.train(was)
        if n == 0:
            return {}
        out = {"loss": pair_loss / n, "accuracy": right / n, "reward_accuracy": right / n, "reward_margin": margin / n,
               "chosen_reward": rc / n, "rejected_reward": rr / n, "chosen_logps": lc / n, "rejected_logps": lr_ / n,
               "pairs": n}
        if nll_n:
            out["nll"] = nll / nll_n
            out["loss"] += self.nll_weight * out["nll"]
        return out
