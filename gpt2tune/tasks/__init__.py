"""Tasks: the recipes layer. Each task turns a validated recipe into a run by wiring
data -> model -> method -> train -> evaluate, and writes the run folder.

A task module has `run(recipe, resume, overwrite, progress) -> dict`; TASKS maps the
recipe's `task` value to its module.
"""

from __future__ import annotations

import importlib

TASKS = {"causal-lm": "gpt2tune.tasks.causal_lm", "chat": "gpt2tune.tasks.chat", "completion": "gpt2tune.tasks.completion",
         "classification": "gpt2tune.tasks.classification", "preference": "gpt2tune.tasks.preference"}


def run_recipe(recipe, resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    if recipe.data.streaming and recipe.task != "causal-lm":
        from gpt2tune.errors import UserError

        raise UserError(f"data.streaming is for task causal-lm, not {recipe.task}")
    module = importlib.import_module(TASKS[recipe.task])
    return module.run(recipe, resume=resume, overwrite=overwrite, progress=progress)
