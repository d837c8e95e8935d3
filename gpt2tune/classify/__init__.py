"""Text classification with GPT-2: the model (`model`: a head on the last real token),
its loss (`objective`), inference (`predict`: load a run and classify texts), metrics
(`metrics`) and plots (`plots`). Training is wired in `gpt2tune.tasks.classification`."""
