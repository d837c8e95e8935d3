"""Beam search: keep the `num_beams` best partial continuations of every prompt by summed
log-probability; a hypothesis that emits the end marker is finished with score
sum_logprob / (new tokens incl. the end marker) ** length_penalty. A prompt is done when it has
`num_beams` finished hypotheses and no running beam can still beat the worst of them (the
`transformers` heuristic with early_stopping=False). Deterministic: no sampling.

Processors (repetition penalty, no-repeat-n-gram, ...) and a constraint (`generate.constraints`) apply to each
beam and follow it when beams are reordered.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from gpt2tune.generate.constraints import Constraint
from gpt2tune.generate.processors import NEG_INF, Processors, constrain
from gpt2tune.generate.rows import Result, context_size, left_pad
from gpt2tune.generate.runner import make_runner
from gpt2tune.generate.sampling import Sampling


@torch.inference_mode()
def beam_search(model, prompts: list[list[int]], eos_id: Optional[int], s: Sampling, suppress_ids: Iterable[int] = (),
                constraint: Optional[Constraint] = None, pad_id: Optional[int] = None, runner: str = "auto") -> list[Result]:
    msg = s.check()
    if msg:
        raise ValueError(msg)
    if not prompts or any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token (start with the begin marker)")
    K, P = s.num_beams, len(prompts)
    device = next(model.parameters()).device
    rows = [list(p) for p in prompts for _ in range(K)]
    width = max(len(r) for r in rows)
    room = context_size(model) - width
    if room <= 0:
        raise ValueError(f"the prompt ({width} tokens) fills the model's context of {context_size(model)}")
    want = constraint.max_new_tokens if constraint is not None else s.max_new_tokens
    if constraint is not None and want > room:
        raise ValueError(f"the form needs {want} more tokens but the model's context leaves {room}")
    budget = min(want, room)
    was_training = model.training
    model.eval()
    runner = make_runner(model, width + budget, runner, s.weights)
    pad = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    ids, mask = left_pad(rows, pad, device)
    logits = runner.prefill(ids, mask)
    V = logits.size(-1)
    proc = Processors(s, rows, V, eos_id, suppress_ids, device)
    if constraint is not None:
        constraint.start([i // K for i in range(len(rows))])
    scores = torch.zeros(P, K, device=device)
    scores[:, 1:] = NEG_INF  # all beams start equal: expand only the first
    seqs: list[list[int]] = [[] for _ in rows]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(P)]
    done = [False] * P
    lp = s.length_penalty
    try:
        for step in range(budget):
            raw = logits
            x = proc(logits.clone(), step)
            allowed = constraint.allowed() if constraint is not None else None
            x = constrain(x, raw, allowed)
            logp = x.log_softmax(-1)
            cand = (scores.reshape(-1, 1) + logp).reshape(P, K * V)
            top_s, top_i = torch.topk(cand, 2 * K, dim=-1)
            top_s, top_i = top_s.tolist(), top_i.tolist()
            new_scores, src, toks = [], [], []
            for p in range(P):
                kept = []
                if not done[p]:
                    for rank, (sc, ix) in enumerate(zip(top_s[p], top_i[p])):
                        if sc == NEG_INF:
                            break
                        b, t = divmod(ix, V)
                        if t == eos_id:
                            if rank < K:
                                hyp = (sc / ((step + 1) ** lp), list(seqs[p * K + b]))
                                finished[p].append(hyp)
                                finished[p].sort(key=lambda h: -h[0])
                                del finished[p][K:]
                            continue
                        kept.append((sc, b, t))
                        if len(kept) == K:
                            break
                    if len(finished[p]) >= K and (not kept or kept[0][0] / ((step + 1) ** lp) <= finished[p][-1][0]):
                        done[p] = True
                if done[p] or not kept:
                    done[p] = True
                    kept = [(NEG_INF, 0, pad)] * K
                while len(kept) < K:
                    kept.append((NEG_INF, kept[0][1], kept[0][2]))
                for sc, b, t in kept:
                    new_scores.append(sc)
                    src.append(p * K + b)
                    toks.append(t)
            if all(done):
                break
            seqs = [seqs[i] + [t] for i, t in zip(src, toks)]
            scores = torch.tensor(new_scores, device=device).reshape(P, K)
            index = torch.tensor(src, dtype=torch.long, device=device)
            runner.select(index)
            proc.reorder(src)
            nxt = torch.tensor(toks, dtype=torch.long, device=device)
            proc.advance(nxt, toks)
            if constraint is not None:
                constraint.reorder(src)
                constraint.advance(nxt)
            if step + 1 < budget:
                logits = runner.step(nxt)
    finally:
        model.train(was_training)
    results = []
    for p in range(P):
        hyps = [(h[0], h[1], "eos") for h in finished[p]]
        if not done[p]:
            n = len(seqs[p * K]) or 1
            for b in range(K):
                sc = float(scores[p, b])
                if sc != NEG_INF:
                    hyps.append((sc / (n ** lp), seqs[p * K + b], "length"))
        hyps.sort(key=lambda h: -h[0])
        for sc, ids_, fin in hyps[: s.num_return_sequences]:
            results.append(Result(prompt_index=p, ids=list(ids_), finish=fin, score=sc))
    return results
