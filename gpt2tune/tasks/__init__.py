"""Tasks: the recipes layer. Each task turns a validated recipe into a run by wiring
data -> model -> method -> train -> evaluate, and writes the run folder.

A task module has `run(recipe, resume, overwrite, progress) -> dict`; `recipe.TASKS` maps the
recipe's `task` value to its module (the one list of tasks).
"""

from __future__ import annotations

import importlib


def run_recipe(recipe, resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    if recipe.data.streaming and recipe.task != "causal-lm":
        from gpt2tune.errors import UserError

        raise UserError(f"data.streaming is for task causal-lm, not {recipe.task}")
    from gpt2tune.recipe import TASKS

    module = importlib.import_module(f"gpt2tune.tasks.{TASKS[recipe.task]}")
    return module.run(recipe, resume=resume, overwrite=overwrite, progress=progress)
