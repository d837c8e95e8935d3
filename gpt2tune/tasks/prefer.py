"""`gpt2tune prefer RUN --form F`: teach a poem model the rules of regulated verse by self-preference.

One round:
1. sample `n` poems per prompt from the current model *without* the verse constraint, and (with
   `candidates: mixed`, the default) `n` more *with* it (`--form F --rhyme --tones standard`: the
   model's own poems written under the rules);
2. score every candidate with the poem metrics (`generate.best_of.poem_score`, classical prosody:
   exact form, rhyme within one 平水韻 group, tone checks, fit to a standard tone pattern, repeated
   characters);
3. pair, per prompt, the i-th best candidate with the i-th worst while their scores differ by at
   least `margin`: chosen = the better one, rejected = the worse one; and (`contrast`, on by
   default) every candidate of exact form that rhymes (in a level tone) with the same poem whose last character of
   one even line from line 4 on is swapped for a level-tone character of another 平水韻 group that
   the model itself wrote at a line end: a pair that differs in the rhyme only, so the preference
   signal lands on the rhyme position (DIR/round-K/pairs.jsonl);
4. train a preference round on the pairs (`task: preference`, DPO by default, the current model as
   DPO's reference) in DIR/round-K/run, a normal run folder;
5. measure the unconstrained samples of the new model (same seeds as before the first round).
The next round starts from the model the last one wrote. DIR/prefer.json and prefer.md hold the
metrics per round, DIR/prefer.png plots them; DIR/round-K/run/model is a plain HF model.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from gpt2tune.errors import UserError

METRICS = ("form_compliance", "rhyme_rate", "tone_conformity", "pattern_rate", "distinct_2", "repeated_char_rate")
LABELS = {"form_compliance": "form compliance", "rhyme_rate": "rhyme rate", "tone_conformity": "tone conformity",
          "pattern_rate": "fits a tone pattern", "distinct_2": "distinct-2", "repeated_char_rate": "repeated chars"}


@dataclass
class PreferConfig:
    model: str  # run folder or model folder
    form: str
    output: str
    n: int = 256  # candidates of each kind per prompt and round
    prompts: tuple[str, ...] = ("",)
    rounds: int = 3
    candidates: str = "mixed"  # "mixed" (unconstrained + constrained samples) or "sampled" (unconstrained only)
    tones: str = "standard"  # strictness of the constrained candidates
    margin: float = 1.0  # minimum score difference between chosen and rejected
    loss: str = "dpo"
    beta: float = 0.1
    rpo_alpha: float = 0.0  # DPO: plus this x the NLL of the chosen poems (RPO)
    lr: float = 3e-5
    epochs: int = 3
    batch_size: int = 16
    method: str = "full"
    eval_samples: int = 50
    seed: int = 0
    contrast: int = 1  # rhyme-contrast pairs per rhyming candidate (see the module docstring); 0: none
    temperature: float = 1.0
    top_k: int = 40
    overwrite: bool = False


def _sampling(cfg: PreferConfig, n: int, seed: int, max_new_tokens: int):
    from gpt2tune.generate.sampling import Sampling

    return Sampling(num_return_sequences=n, seed=seed, top_k=cfg.top_k, temperature=cfg.temperature,
                    max_new_tokens=max_new_tokens)


def sample(model, tok, framing, cfg: PreferConfig, spec, seed: int, n: int, constrained: bool) -> list:
    """`n` samples per prompt (`Sample`s with prompt_index), free or under `spec`."""
    from gpt2tune.generate.text import generate_texts

    out = []
    for i, prompt in enumerate(cfg.prompts):
        samples, _ = generate_texts(model, tok, framing, [prompt], _sampling(cfg, n, seed + 7919 * i, spec.slots + 8),
                                    form=spec if constrained else None)
        for s in samples:
            s.prompt_index = i
        out += samples
    return out


def free_metrics(model, tok, framing, cfg: PreferConfig, spec) -> dict:
    """Poem metrics of `eval_samples` unconstrained samples per prompt (fixed seeds)."""
    from gpt2tune.evaluate.poems import poem_metrics

    texts = [s.text for s in sample(model, tok, framing, cfg, spec, 10_000 + cfg.seed, cfg.eval_samples, False)]
    m = poem_metrics(texts, spec.rows, spec.cols, "classical").as_dict()
    m["examples"] = texts[:3]
    return m


def make_pairs(samples: list, scores: list[float], prompts, margin: float) -> list[dict]:
    """Per prompt: the i-th best with the i-th worst while the scores differ by >= margin."""
    by_prompt: dict[int, list] = {}
    for s, sc in zip(samples, scores):
        by_prompt.setdefault(s.prompt_index, []).append((sc, s.completion))
    pairs = []
    for p, items in sorted(by_prompt.items()):
        items.sort(key=lambda t: -t[0])
        seen = set()
        uniq = [t for t in items if not (t[1] in seen or seen.add(t[1]))]
        for i in range(len(uniq) // 2):
            (hi, chosen), (lo, rejected) = uniq[i], uniq[-1 - i]
            if hi - lo < margin:
                break
            pairs.append({"prompt": prompts[p], "chosen": chosen, "rejected": rejected,
                          "score_chosen": round(hi, 4), "score_rejected": round(lo, 4)})
    return pairs


def rhyme_contrasts(samples: list, prompts, spec, seed: int, per_poem: int = 1) -> list[dict]:
    """Pairs (a rhyming poem, the same poem with one rhyme broken); see the module docstring."""
    import random
    from collections import Counter

    from gpt2tune.evaluate import classical
    from gpt2tune.evaluate.poems import loose_lines, parse_poem, rhyme_checks
    from gpt2tune.evaluate.prosody import LEVEL

    rng = random.Random(seed)
    ends = Counter()
    for s in samples:
        for line in loose_lines(s.text, spec.rows):
            if line and LEVEL in classical.info(line[-1]).tones:
                ends[line[-1]] += 1
    pool = sorted(ends)
    weights = [ends[c] for c in pool]
    pairs, seen = [], set()
    for s in samples:
        lines = parse_poem(s.text, spec.rows, spec.cols)
        if lines is None or s.text in seen:
            continue
        seen.add(s.text)
        ok, n = rhyme_checks(lines, "classical")
        if not n or ok < n or LEVEL not in classical.info(lines[1][-1]).tones:
            continue  # (regulated verse rhymes in level tones)
        groups = classical.rhyme_groups(lines[1][-1])
        made = set()
        for _ in range(20 * per_poem):
            if len(made) == per_poem:
                break
            line = rng.choice(range(3, spec.rows, 2))
            ch = rng.choices(pool, weights)[0] if pool else None
            if ch is None or classical.rhyme_groups(ch) & groups or ch in s.text:
                continue
            new = list(lines)
            new[line] = new[line][:-1] + ch
            text = "".join(x + ("，" if i % 2 == 0 else "。") for i, x in enumerate(new))
            head = len(s.text) - len(s.completion)
            if text[:head] != s.text[:head]:
                continue  # the swap would touch the prompt
            if text in made:
                continue
            made.add(text)
            pairs.append({"prompt": prompts[s.prompt_index], "chosen": s.completion, "rejected": text[head:],
                          "kind": "rhyme-contrast"})
    return pairs


def _train_recipe(cfg: PreferConfig, base: str, pairs_file: Path, run_dir: Path):
    from gpt2tune.recipe import recipe_from_dict

    raw = {
        "task": "preference",
        "preference": {"loss": cfg.loss, "beta": cfg.beta, "rpo_alpha": cfg.rpo_alpha},
        "model": {"name": base},
        "data": {"source": f"jsonl:{pairs_file}", "val_fraction": 0.1, "max_length": 128},
        "method": {"name": cfg.method},
        "train": {"lr": cfg.lr, "epochs": cfg.epochs, "batch_size": cfg.batch_size, "schedule": "linear",
                  "warmup_ratio": 0.1, "seed": cfg.seed, "eval_every": 1_000_000, "precision": "auto"},
        "output": {"dir": str(run_dir)},
    }
    return recipe_from_dict(raw)


def _model_folder(path: str) -> str:
    p = Path(path)
    if (p / "model").is_dir() and (p / "recipe.yaml").exists():
        p = p / "model"
    if p.is_dir() and (p / "adapter_config.json").exists():
        raise UserError(f"{p} holds an adapter: merge it into its base first (gpt2tune export RUN --merge) and "
                        "start prefer from the merged model")
    return str(p)


def prefer(cfg: PreferConfig, progress: bool = True, log=print) -> dict:
    from gpt2tune.generate.best_of import poem_score
    from gpt2tune.generate.forms import form_spec
    from gpt2tune.method.io import load_run
    from gpt2tune.tasks import run_recipe

    if cfg.candidates not in ("mixed", "sampled"):
        raise UserError(f"--candidates must be mixed or sampled, not {cfg.candidates!r}")
    if cfg.n < 2 or cfg.rounds < 1 or cfg.eval_samples < 1:
        raise UserError("-n must be at least 2, --rounds and --eval-samples at least 1")
    out = Path(cfg.output)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise UserError(f"{out} is not empty: pass --overwrite or another --output")
    out.mkdir(parents=True, exist_ok=True)
    spec = form_spec(cfg.form, rhyme=True, prosody="classical", tones=cfg.tones)
    base = _model_folder(cfg.model)
    model, tok, framing = load_run(base)
    t0 = time.time()
    before = free_metrics(model, tok, framing, cfg, spec)
    rounds = [{"round": 0, "model": base, "metrics": before}]
    log(f"before: {_line(before)}")
    for k in range(1, cfg.rounds + 1):
        rdir = out / f"round-{k}"
        rdir.mkdir(parents=True, exist_ok=True)
        seed = cfg.seed + 1000 * k
        cands = sample(model, tok, framing, cfg, spec, seed, cfg.n, False)
        if cfg.candidates == "mixed":
            cands += sample(model, tok, framing, cfg, spec, seed + 500, cfg.n, True)
        scores = [poem_score(s.text, spec.rows, spec.cols, "poem", "classical") for s in cands]
        pairs = make_pairs(cands, scores, cfg.prompts, cfg.margin)
        if cfg.contrast:
            pairs += rhyme_contrasts(cands, cfg.prompts, spec, seed, cfg.contrast)
        if len(pairs) < 4:
            raise UserError(f"round {k}: only {len(pairs)} pairs differ by --margin {cfg.margin}: "
                            "raise -n or lower --margin")
        pairs_file = rdir / "pairs.jsonl"
        pairs_file.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
        scored = [p for p in pairs if "score_chosen" in p]
        log(f"round {k}: {len(cands)} candidates, {len(scored)} scored pairs (mean score chosen "
            f"{sum(p['score_chosen'] for p in scored) / max(1, len(scored)):.2f}, rejected "
            f"{sum(p['score_rejected'] for p in scored) / max(1, len(scored)):.2f}), "
            f"{len(pairs) - len(scored)} rhyme-contrast pairs -> {pairs_file}")
        recipe = _train_recipe(cfg, base, pairs_file, rdir / "run")
        res = run_recipe(recipe, overwrite=True, progress=progress)
        base = str(rdir / "run" / "model")
        model, tok, framing = load_run(base)
        after = free_metrics(model, tok, framing, cfg, spec)
        rounds.append({"round": k, "model": base, "pairs": len(pairs), "metrics": after,
                       "train": {key: res.get(key) for key in ("final", "best", "steps") if key in res}})
        log(f"after round {k}: {_line(after)}")
    result = {"config": asdict(cfg), "form": cfg.form, "rounds": rounds, "seconds": round(time.time() - t0, 1)}
    (out / "prefer.json").write_text(json.dumps(result, ensure_ascii=False, indent=2), encoding="utf-8")
    (out / "prefer.md").write_text(table(result), encoding="utf-8")
    plot(result, out / "prefer.png")
    return result


def _line(m: dict) -> str:
    return ", ".join(f"{LABELS[k]} {_pct(m.get(k))}" for k in METRICS)


def _pct(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def table(result: dict) -> str:
    rows = result["rounds"]
    head = "| metric (unconstrained samples) | " + " | ".join(
        "base" if r["round"] == 0 else f"round {r['round']}" for r in rows) + " |"
    lines = [f"# prefer: {result['form']}, {result['config']['eval_samples']} samples per prompt, classical prosody",
             "", head, "|---|" + "---|" * len(rows)]
    for k in METRICS:
        lines.append(f"| {LABELS[k]} | " + " | ".join(_pct(r["metrics"].get(k)) for r in rows) + " |")
    lines += ["", f"{result['seconds']:.0f} s in all."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rounds"]
    xs = [r["round"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for k in METRICS:
        ys = [r["metrics"].get(k) for r in rows]
        if all(y is not None for y in ys):
            ax.plot(xs, [100 * y for y in ys], marker="o", label=LABELS[k])
    ax.set_xticks(xs)
    ax.set_xlabel("preference round (0: base model)")
    ax.set_ylabel("% of unconstrained samples / checks")
    ax.set_title(f"prefer: {result['form']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
