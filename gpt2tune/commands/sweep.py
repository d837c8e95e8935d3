"""`gpt2tune sweep RECIPE --grid FIELD=V1,V2,... [--grid ...] [--random N] [--set ...] [--output DIR]`."""

from __future__ import annotations

import argparse
import sys
import textwrap

NAME = "sweep"


def add_parser(sub):
    p = sub.add_parser(
        "sweep", help="train a recipe at several settings (grid or random) and pick the best",
        description=textwrap.fill("Train the recipe once per point of a grid (every combination of the --grid values) or of "
                    "--random N draws, each in its own process in DIR/<point>/, then write DIR/sweep.md, .csv, "
                    ".json and sweep.png (the metric against each swept field, the best point marked) and "
                    "DIR/best.yaml, the best run's resolved recipe (output.dir as in RECIPE) to train in full. "
                    "A point that fails (e.g. a learning rate that diverges) is marked failed; the others go on.", 100),
        epilog="Examples:\n"
               "  gpt2tune sweep recipes/quickstart.yaml --grid train.lr=1e-4,3e-4,1e-3 --set train.max_steps=200\n"
               "  gpt2tune sweep R.yaml --grid train.lr=1e-4,1e-3 --grid method.rank=4,16 --set method.name=lora\n"
               "  gpt2tune sweep R.yaml --random 8 --grid train.lr=1e-5:1e-3:log --grid train.batch_size=8,16\n"
               "  gpt2tune sweep R.yaml --grid train.lr=1e-5:1e-2:log:6 --metric 'validation loss'",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="path to a YAML recipe")
    p.add_argument("--grid", action="append", default=[], metavar="FIELD=VALUES",
                   help="a swept field (repeatable): a list V1,V2,... (anything --set accepts), or a range "
                        "LOW:HIGH[:log][:int] drawn with --random, or LOW:HIGH[:log]:K for K points in a grid")
    p.add_argument("--random", type=int, default=None, metavar="N",
                   help="N random points instead of the full grid (lists: uniform choice; ranges: uniform or "
                        "log-uniform; integer bounds give integers)")
    p.add_argument("--seed", type=int, default=None, help="seed of the --random draws (default: train.seed)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any recipe field for every point, e.g. --set train.max_steps=200")
    p.add_argument("--metric", default=None, metavar="'SPLIT NAME'",
                   help="what ranks the points, from each run's eval.json: 'validation perplexity' (default), "
                        "'validation loss', classification 'validation accuracy' (its default) or "
                        "'validation macro_f1', ...")
    p.add_argument("--mode", choices=["min", "max"], default=None,
                   help="whether lower or higher is better (default: from the metric's name)")
    p.add_argument("--output", "-o", default=None, metavar="DIR", help="default: output.dir + '-sweep'")
    p.add_argument("--overwrite", action="store_true", help="replace an existing sweep in DIR")
    p.add_argument("--dry-run", action="store_true", help="list the points and stop")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(a) -> int:
    from gpt2tune.recipe import load_raw
    from gpt2tune.tasks.sweep import sweep

    result = sweep(load_raw(a.recipe), a.grid, a.overrides, output=a.output, random_n=a.random, seed=a.seed,
                   metric=a.metric, mode=a.mode, overwrite=a.overwrite, progress=not a.no_progress,
                   dry_run=a.dry_run)
    print(result["table"])
    if a.dry_run:
        return 0
    best = result["best"]
    folder = result["folder"]
    print(f"best: {best['point']} ({best['metric']:.4g}); recipe {folder}/best.yaml")
    print(f"wrote {folder}/sweep.md, .csv, .json, sweep.png and best.yaml", file=sys.stderr)
    return 0
