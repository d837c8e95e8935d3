"""Tasks: the recipes layer. Each task turns a validated recipe into a run by wiring
data -> model -> method -> train -> evaluate, and writes the run folder."""
