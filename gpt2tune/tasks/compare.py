"""`gpt2tune compare`: train several methods on one recipe and measure them side by side.

Every method gets the same data, budget (steps/epochs), batch and seed; only `method` and,
from `compare.lr`, the learning rate differ. Each method trains in its own process
(`python -m gpt2tune.tasks.compare JOB.json`) so that its memory is its own: the peak
resident set size is the kernel's high-water mark of that process (VmHWM on Linux, getrusage
ru_maxrss elsewhere, psutil's peak working set on Windows), read right after training - it includes Python,
torch, the data and the model, which is why a "base" process that only loads the base
model and scores the reference text is measured too. On a GPU the peak allocated memory
is reported as well. The timed loop has no intermediate evaluation or checkpoint
(`train.eval_every` and `train.save_every` are set to 0).

Preference recipes (`task: preference`) compare validation loss, reward accuracy and reward margin
before and after (and forgetting, with `compare.reference`).

Forgetting is the perplexity of `compare.reference` (any data source, read with the
recipe's data options) under the base model and under each fine-tuned model.

Writes DIR/<method>/ (a normal run folder each), DIR/comparison.{md,csv,json,png}.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional

from gpt2tune.errors import UserError
from gpt2tune.tasks.jobs import markdown_table as _table, prepare_output, run_job, write_csv

DEFAULT_METHODS = ["full", "partial", "lora", "prompt-tuning", "adapter"]
TOKENIZER_FILES = ("tokenizer", "vocab", "merges", "special_tokens_map", "added_tokens")
COLUMNS = [  # key, header, format
    ("method", "method", "{}"),
    ("lr", "lr", "{:g}"),
    ("trainable", "trainable params", "{:,}"),
    ("trainable_percent", "trainable %", "{:.2f}"),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
    ("seconds_per_step", "s/step", "{:.3f}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("saved_mb", "saved MB", "{:.3f}"),
    ("val_loss_start", "val loss before", "{:.3f}"),
    ("val_loss", "val loss after", "{:.3f}"),
    ("val_ppl", "val ppl after", "{:.1f}"),
    ("ref_ppl_before", "ref ppl before", "{:.1f}"),
    ("ref_ppl_after", "ref ppl after", "{:.1f}"),
    ("forgetting_percent", "forgetting %", "{:+.1f}"),
]


# -- measuring, inside a worker process ---------------------------------------------------


def peak_rss_bytes() -> int:
    """The high-water mark of this process's resident memory. On Linux `VmHWM` of
    /proc/self/status: `ru_maxrss` would start from the parent's resident set at fork (it carries
    over exec), so every method would show at least the size of the comparing process."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB
    except ImportError:  # Windows
        import psutil

        info = psutil.Process().memory_info()
        return int(getattr(info, "peak_wset", info.rss))


def gpu_peak_bytes() -> Optional[int]:
    import torch

    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def score_texts(model, tok, framing, texts: list[str], max_length: int, batch_size: int = 16) -> dict:
    """Token-weighted loss and perplexity of `texts` (fp32, framed and cut like training samples)."""
    import torch

    from gpt2tune.data.dataset import collate, tokenize_texts
    from gpt2tune.train.objective import evaluate

    ids, _ = tokenize_texts(tok, texts, framing.bos, framing.eos, max_length, False)
    rows = sorted(ids, key=len)
    batches = [collate(rows[i:i + batch_size], framing.pad) for i in range(0, len(rows), batch_size)]
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        return evaluate(model, batches, lambda b: {k: v.to(device) for k, v in b.items()}, contextlib.nullcontext)


def reference_texts(recipe) -> list[str]:
    from gpt2tune.tasks.common import read_texts

    texts, _ = read_texts(recipe.data, recipe.compare.reference)
    n = recipe.compare.reference_limit
    return texts[:: max(1, len(texts) // n)][:n]  # spread over the source, deterministic


def work(job: dict) -> dict:
    """Run one job: train a method ("train") or score the untouched base ("base")."""
    from gpt2tune.recipe import recipe_from_dict

    recipe = recipe_from_dict(job["recipe"])
    out: dict = {}
    if job["mode"] == "train":
        from gpt2tune.method.io import load_run
        from gpt2tune.tasks import run_recipe

        t0 = time.perf_counter()
        out["report"] = run_recipe(recipe, overwrite=True, progress=job.get("progress", False))
        out["wall_seconds"] = time.perf_counter() - t0
        out["peak_rss_bytes"], out["gpu_peak_bytes"] = peak_rss_bytes(), gpu_peak_bytes()
        if recipe.compare.reference:
            model, tok, framing = load_run(recipe.output.dir)
            out["reference"] = score_texts(model, tok, framing, reference_texts(recipe), recipe.data.max_length)
    else:
        from gpt2tune.tasks.common import load_base, train_val_texts

        # (a tokenizer built from the data is read back from the first method's run folder)
        train_texts = [] if recipe.task == "preference" else train_val_texts(recipe.data)[0]
        base = load_base(recipe.model, train_texts, Path(job["run"]), True, recipe.data.max_length, recipe.train.seed)
        if recipe.compare.reference:
            texts = reference_texts(recipe)
            out["reference"] = score_texts(base.model, base.tokenizer, base.framing, texts, recipe.data.max_length)
            out["reference_samples"] = len(texts)
        out["peak_rss_bytes"], out["gpu_peak_bytes"] = peak_rss_bytes(), gpu_peak_bytes()
    return out


def _worker_main(argv: list[str]) -> int:
    job_path = Path(argv[0])
    job = json.loads(job_path.read_text(encoding="utf-8"))
    try:
        result = work(job)
    except UserError as err:
        print(f"gpt2tune: error: {err}", file=sys.stderr)
        return 2
    Path(job["result"]).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


# -- orchestrating, in the parent ---------------------------------------------------------


def method_configs(recipe, names: list[str]) -> dict:
    from gpt2tune.method.config import METHODS

    if len(set(names)) != len(names):
        raise UserError(f"--methods: a method is listed twice ({', '.join(names)})")
    listed = {m.name: m for m in recipe.compare.methods}
    out = {}
    for n in names:
        if n not in METHODS:
            raise UserError(f"--methods: unknown method {n!r}; valid: {', '.join(METHODS)}")
        out[n] = listed.get(n) or (recipe.method if recipe.method.name == n else METHODS[n]())
    return out


def _job_recipe(recipe, cfg, lr: float, run_dir: Path) -> dict:
    from gpt2tune.recipe import recipe_from_dict

    raw = recipe.model_dump(mode="json")
    raw["method"] = cfg.model_dump(mode="json")
    raw["train"].update(lr=lr, eval_every=0, save_every=0)
    raw["output"]["dir"] = str(run_dir)
    recipe_from_dict(raw)  # validate before spending time on training
    return raw


def _saved_bytes(run_dir: Path) -> int:
    """Size of what the method saved (model/ or adapter/), tokenizer files left out."""
    folder = run_dir / "adapter" if (run_dir / "adapter").is_dir() else run_dir / "model"
    return sum(f.stat().st_size for f in folder.rglob("*")
               if f.is_file() and not f.name.startswith(TOKENIZER_FILES))


CLS_COLUMNS = [c for c in COLUMNS if c[0] not in ("tokens_per_s",) and not c[0].startswith(("val_", "ref_", "forg"))] + [
    ("val_accuracy", "val accuracy %", "{:.2f}"),  # classification: accuracy and macro-F1 instead of perplexities
    ("test_accuracy", "test accuracy %", "{:.2f}"),
    ("test_macro_f1", "test macro-F1", "{:.4f}"),
]


def _cls_row(name: str, lr: float, res: dict, run_dir: Path) -> dict:
    rep = res["report"]
    params = rep["parameters"]
    val, test = rep.get("validation") or {}, rep.get("test") or {}
    pct = lambda d: 100.0 * d["accuracy"] if d else None  # noqa: E731
    return {
        "method": name, "lr": lr, "trainable": params["trainable"], "total": params["total"],
        "trainable_percent": params["percent"], "peak_rss_mb": res["peak_rss_bytes"] / 2**20,
        "gpu_peak_mb": res["gpu_peak_bytes"] / 2**20 if res.get("gpu_peak_bytes") else None,
        "steps": rep["steps"], "seconds_per_step": rep["train_seconds"] / max(rep["steps"], 1),
        "saved_mb": _saved_bytes(run_dir) / 2**20, "val_accuracy": pct(val), "val_macro_f1": val.get("macro_f1"),
        "test_accuracy": pct(test), "test_macro_f1": test.get("macro_f1"),
    }


PREF_COLUMNS = COLUMNS[:10] + [  # preference: reward accuracy and margin on the validation pairs
    ("reward_accuracy_start", "reward acc before %", "{:.1f}"),
    ("reward_accuracy", "reward acc after %", "{:.1f}"),
    ("reward_margin", "reward margin after", "{:+.4f}"),
] + COLUMNS[11:]


def _pref_row(name: str, lr: float, res: dict, base: dict, run_dir: Path) -> dict:
    row = _row(name, lr, res, base, run_dir)
    rep = res["report"]
    val, start = rep.get("validation") or {}, rep.get("validation_at_start") or {}
    pct = lambda d: 100.0 * d["reward_accuracy"] if "reward_accuracy" in d else None  # noqa: E731
    row.update(val_ppl=None, reward_accuracy_start=pct(start), reward_accuracy=pct(val),
               reward_margin=val.get("reward_margin"), loss=rep.get("loss"), reference_seconds=rep.get("reference_seconds"))
    return row


def _row(name: str, lr: float, res: dict, base: dict, run_dir: Path) -> dict:
    rep = res["report"]
    params, val, start = rep["parameters"], rep.get("validation") or {}, rep.get("validation_at_start") or {}
    row = {
        "method": name, "lr": lr, "trainable": params["trainable"], "total": params["total"],
        "trainable_percent": params["percent"], "peak_rss_mb": res["peak_rss_bytes"] / 2**20,
        "peak_rss_over_base_mb": (res["peak_rss_bytes"] - base["peak_rss_bytes"]) / 2**20 if base else None,
        "gpu_peak_mb": res["gpu_peak_bytes"] / 2**20 if res.get("gpu_peak_bytes") else None,
        "steps": rep["steps"], "seconds_per_step": rep["train_seconds"] / max(rep["steps"], 1),
        "tokens_per_s": rep["train_tokens_per_s"], "saved_mb": _saved_bytes(run_dir) / 2**20,
        "val_loss_start": start.get("loss"), "val_loss": val.get("loss"), "val_ppl": val.get("perplexity"),
        "ref_ppl_before": None, "ref_ppl_after": None, "forgetting_percent": None,
    }
    if res.get("reference") and base.get("reference"):
        before, after = base["reference"]["perplexity"], res["reference"]["perplexity"]
        row.update(ref_ppl_before=before, ref_ppl_after=after, forgetting_percent=100.0 * (after / before - 1.0))
    return row


def markdown_table(rows: list[dict], columns=None) -> str:
    return _table(rows, columns or COLUMNS)


def write_reports(folder: Path, rows: list[dict], base: dict, meta: dict) -> str:
    classification, preference = meta.get("task") == "classification", meta.get("task") == "preference"
    table = markdown_table(rows, CLS_COLUMNS if classification else PREF_COLUMNS if preference else COLUMNS)
    notes = [
        f"# Fine-tuning methods compared: {meta['data']}", "",
        f"Base: {meta['base']}. Budget: {meta['steps']} optimizer steps of batch {meta['batch_size']} "
        f"(max {meta['max_length']} tokens), seed {meta['seed']}, precision {meta['precision']}, "
        f"on {meta['machine']}.", "",
        table, "",
        "- **peak RSS**: high-water mark of the training process's resident memory (its own process per "
        "method; includes Python, torch, data and model)."
        + (f" A process that only loads the base model and scores the reference peaked at "
           f"{base['peak_rss_bytes'] / 2**20:.0f} MB." if base.get("peak_rss_bytes") else ""),
        "- **s/step, tokens/s**: the training loop only (non-pad tokens; no evaluation or checkpoints inside)."
        if not classification else "- **s/step**: training time (LM pretraining stage included) over classifier steps.",
        "- **saved MB**: what the run saved for the method (model/ or adapter/, tokenizer files excluded).",
        "- **val**: the recipe's validation pairs, before and after: preference loss, reward accuracy (the chosen "
        "response's implicit reward above the rejected one's) and the mean reward margin." if preference else
        "- **val**: the recipe's validation split, before and after fine-tuning." if not classification else
        "- **accuracy, macro-F1**: the recipe's validation and test splits after training (as in each run's eval.json).",
    ]
    if meta.get("reference"):
        notes.append(f"- **forgetting**: perplexity on `{meta['reference']}` ({meta['reference_samples']} samples) "
                     "under the base model (before) and the fine-tuned one (after); + means worse.")
    (folder / "comparison.md").write_text("\n".join(notes) + "\n", encoding="utf-8")
    write_csv(folder / "comparison.csv", rows)
    (folder / "comparison.json").write_text(json.dumps({"settings": meta, "base": base, "methods": rows}, indent=2,
                                                       ensure_ascii=False) + "\n", encoding="utf-8")
    plot_comparison(rows, folder / "comparison.png", classification, preference)
    return table


def plot_comparison(rows: list[dict], path: Path, classification: bool = False, preference: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    panels = [("trainable_percent", "trainable parameters (%)", True), ("peak_rss_mb", "peak RSS (MB)", False),
              ("seconds_per_step", "seconds per step", False), ("saved_mb", "saved size (MB)", True),
              ("val_ppl", "validation perplexity (after)", False), ("ref_ppl_after", "reference perplexity", False)]
    if preference:
        panels[4] = ("reward_accuracy", "validation reward accuracy (%, after)", False)
    if classification:
        panels[4:] = [("val_accuracy", "validation accuracy (%)", False), ("test_accuracy", "test accuracy (%)", False)]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title, log) in zip(axes.flat, panels):
        vals = [r.get(key) if r.get(key) is not None else 0.0 for r in rows]
        ax.bar(names, vals, color=[colors[i % len(colors)] for i in range(len(names))])
        if key == "val_ppl" and rows[0].get("val_loss_start") is not None:
            ax.axhline(math.exp(min(rows[0]["val_loss_start"], 50)), ls="--", color="gray", label="before")
            ax.legend()
        if key == "ref_ppl_after" and rows[0].get("ref_ppl_before"):
            ax.axhline(rows[0]["ref_ppl_before"], ls="--", color="gray", label="base model")
            ax.legend()
        if log and all(v > 0 for v in vals):
            ax.set_yscale("log")
        if key.endswith("accuracy") and any(vals) and not preference:  # differences of a few points: zoom in
            ax.set_ylim(max(0.0, min(v for v in vals if v) - 5.0), 100.0)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Fine-tuning methods on the same data, budget and seed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(recipe, methods: Optional[list[str]] = None, output: Optional[str] = None, overwrite: bool = False,
            progress: bool = True, log=None) -> dict:
    from gpt2tune.tasks.common import log as default_log

    log = log or default_log
    if recipe.task not in ("causal-lm", "classification", "preference"):
        raise UserError(f"compare measures tasks causal-lm, classification and preference, not {recipe.task}")
    classification = recipe.task == "classification"
    if classification and recipe.compare.reference:
        raise UserError("compare.reference (forgetting) applies to causal-lm comparisons; remove it for classification")
    names = methods or [m.name for m in recipe.compare.methods] or list(DEFAULT_METHODS)
    configs = method_configs(recipe, names)
    folder = Path(output or recipe.output.dir.rstrip("/") + "-compare")
    jobs = {n: _job_recipe(recipe, cfg, recipe.compare.lr.get(n, recipe.train.lr), folder / n)
            for n, cfg in configs.items()}
    prepare_output(folder, overwrite, "comparison")
    work_dir = folder / ".jobs"
    work_dir.mkdir()

    results = {}
    for i, n in enumerate(names, 1):
        job = {"mode": "train", "recipe": jobs[n], "progress": progress, "result": str(work_dir / f"{n}.result.json")}
        results[n] = run_job(job, work_dir / f"{n}.job.json", f"[{i}/{len(names)}] training {n} "
                                 f"(lr {jobs[n]['train']['lr']:g})", log)
    if classification:
        base: dict = {}
        rows = [_cls_row(n, jobs[n]["train"]["lr"], results[n], folder / n) for n in names]
    elif recipe.task == "preference":
        base = {}
        if recipe.compare.reference:
            base_job = {"mode": "base", "recipe": jobs[names[0]], "run": str(folder / names[0]),
                        "result": str(work_dir / "base.result.json")}
            base = run_job(base_job, work_dir / "base.job.json", "scoring the base model", log)
        rows = [_pref_row(n, jobs[n]["train"]["lr"], results[n], base, folder / n) for n in names]
    else:
        base_job = {"mode": "base", "recipe": jobs[names[0]], "run": str(folder / names[0]),
                    "result": str(work_dir / "base.result.json")}
        base = run_job(base_job, work_dir / "base.job.json", "scoring the base model", log)
        rows = [_row(n, jobs[n]["train"]["lr"], results[n], base, folder / n) for n in names]
    import torch

    t = recipe.train
    meta = {
        "task": recipe.task, "data": recipe.data.source, "base": recipe.model.name or f"scratch:{recipe.model.size}",
        "steps": rows[0]["steps"], "batch_size": t.batch_size, "max_length": recipe.data.max_length, "seed": t.seed,
        "precision": t.precision, "reference": recipe.compare.reference,
        "reference_samples": base.get("reference_samples", 0),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
                   + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        "methods": {n: configs[n].model_dump(mode="json") for n in names},
        "memory": "peak RSS = VmHWM (Linux; ru_maxrss elsewhere) of each method's own training process, read after training",
    }
    table = write_reports(folder, rows, base, meta)
    return {"folder": str(folder), "rows": rows, "table": table}


if __name__ == "__main__":
    raise SystemExit(_worker_main(sys.argv[1:]))
