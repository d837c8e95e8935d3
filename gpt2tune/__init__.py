"""gpt2tune: fine-tune GPT-2-family models and use them.

The package reads as a pipeline: data -> model -> method -> train ->
generate / evaluate, with `recipe` (typed run description) and `cli` on top.
"""

__version__ = "0.1.0"
