"""`gpt2tune compare RECIPE --methods full,partial,lora,prompt-tuning,adapter [--set ...] [--output DIR]`."""

from __future__ import annotations

import sys

NAME = "compare"


def add_parser(sub):
    p = sub.add_parser("compare", help="train several methods on the same recipe and compare them",
                       description="Train each method on the recipe's data with the same budget and seed (each in "
                                   "its own process, in DIR/<method>/), then write DIR/comparison.md, .csv, .json "
                                   "and comparison.png: trainable parameters, peak memory, seconds per step, "
                                   "tokens/s, size on disk, validation loss and perplexity, and forgetting "
                                   "(perplexity on compare.reference before and after).",
                       epilog="Example: gpt2tune compare recipes/compare-songci.yaml --methods full,lora,adapter")
    p.add_argument("recipe", help="path to a YAML recipe (its compare section sets the methods, "
                                  "per-method learning rates and the forgetting reference)")
    p.add_argument("--methods", default=None,
                   help="comma-separated method names (default: compare.methods, else full,partial,lora,"
                        "prompt-tuning,adapter)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any recipe field for every method, e.g. --set train.max_steps=100")
    p.add_argument("--output", "-o", default=None, metavar="DIR", help="default: output.dir + '-compare'")
    p.add_argument("--overwrite", action="store_true", help="replace an existing comparison in DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(a) -> int:
    from gpt2tune.recipe import load_recipe
    from gpt2tune.tasks.compare import compare

    recipe = load_recipe(a.recipe, a.overrides)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()] if a.methods else None
    result = compare(recipe, methods=methods, output=a.output, overwrite=a.overwrite, progress=not a.no_progress)
    print(result["table"])
    print(f"wrote {result['folder']}/comparison.md, .csv, .json and comparison.png", file=sys.stderr)
    return 0
