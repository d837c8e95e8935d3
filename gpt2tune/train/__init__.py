"""Train: device and precision (`device`), optimizer and schedule (`optim`), losses and
validation (`objective`), checkpoints (`checkpoint`), where the rows go (`loggers`, `tracking`),
plots (`plots`), and the loop itself (`loop`)."""
