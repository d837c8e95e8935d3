"""Train: device and precision (`device`), optimizer and schedule (`optim`), losses and
validation (`objective`), checkpoints (`checkpoint`), metrics and plots (`logging`,
`plots`), and the loop itself (`loop`)."""
