"""`gpt2tune train RECIPE`."""

from __future__ import annotations

NAME = "train"


def add_parser(sub):
    p = sub.add_parser("train", help="fine-tune a model as a recipe describes",
                       description="Train a model from a YAML recipe. The run folder (output.dir) receives "
                                   "recipe.yaml, model/ (or adapter/), checkpoints/, metrics.jsonl, plots/ and eval.json.",
                       epilog="Example: gpt2tune train recipes/quickstart.yaml --set train.max_steps=200")
    p.add_argument("recipe", help="path to a YAML recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any recipe field, e.g. --set train.lr=3e-5 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in output.dir from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in output.dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(a) -> int:
    from gpt2tune.recipe import load_recipe
    from gpt2tune.tasks import run_recipe

    recipe = load_recipe(a.recipe, a.overrides)
    run_recipe(recipe, resume=a.resume, overwrite=a.overwrite, progress=not a.no_progress)
    return 0
