"""`gpt2tune lr-find RECIPE [--set ...] [--start 1e-7 --end 1 --steps 100] [--output DIR]`."""

from __future__ import annotations

import argparse
import sys
import textwrap

NAME = "lr-find"


def add_parser(sub):
    p = sub.add_parser(
        "lr-find", help="learning-rate range test: loss against an exponentially growing learning rate",
        description=textwrap.fill(
            "Train the recipe's model and method on its data while the learning rate grows exponentially from "
            "--start to --end over --steps optimizer steps (no warmup, no schedule, nothing saved but the results), "
            "stopping early once the smoothed loss exceeds 4x its best. Prints a suggested learning rate: where "
            "the smoothed loss falls fastest (as fastai's lr_find), and the lr of its minimum / 10. Writes "
            "DIR/lr_find.json and DIR/lr_find.png (loss against learning rate, log scale). Tasks causal-lm and "
            "classification.", 100),
        epilog="Example:\n  gpt2tune lr-find recipes/quickstart.yaml --steps 100 --output runs/lr-find\n"
               "  then: gpt2tune train recipes/quickstart.yaml --set train.lr=<suggested>",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="path to a YAML recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any recipe field, e.g. --set method.name=lora (the batch size matters: use "
                        "the one you will train with)")
    p.add_argument("--start", type=float, default=1e-7, help="first learning rate (default 1e-7)")
    p.add_argument("--end", type=float, default=1.0, help="last learning rate (default 1)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps of the ramp (default 100)")
    p.add_argument("--diverge", type=float, default=4.0,
                   help="stop once the smoothed loss exceeds this many times its best (default 4)")
    p.add_argument("--output", "-o", default=None, metavar="DIR", help="default: output.dir + '-lr-find'")
    p.add_argument("--overwrite", action="store_true", help="replace earlier results in DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(a) -> int:
    from gpt2tune.recipe import load_recipe
    from gpt2tune.tasks.lr_find import lr_find, summary

    recipe = load_recipe(a.recipe, a.overrides)
    result = lr_find(recipe, output=a.output, start=a.start, end=a.end, steps=a.steps, diverge=a.diverge,
                     overwrite=a.overwrite, progress=not a.no_progress)
    print(summary(result))
    print(f"wrote {result['folder']}/lr_find.json and lr_find.png", file=sys.stderr)
    return 0
