"""Training plots from metrics.jsonl records (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(records: list[dict], out_dir: Path) -> list[Path]:
    """plots/loss.png (train and validation loss) and plots/accuracy.png (next-token accuracy)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "validation"]
    return [_curve(out_dir / "loss.png", "loss", train, val, "loss (nats / token)", "Loss"),
            _curve(out_dir / "accuracy.png", "accuracy", train if train and "accuracy" in train[0] else [], val,
                   "next-token accuracy", "Accuracy (non-pad tokens)")]


def _curve(path: Path, key: str, train: list[dict], val: list[dict], ylabel: str, title: str) -> Path:
    """One metric over optimizer steps: train as a line, validation as points."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if train:
        ax.plot([r["step"] for r in train], [r[key] for r in train], label="train", color="tab:blue", alpha=0.8)
    if val:
        ax.plot([r["step"] for r in val], [r[key] for r in val], "o-", label="validation", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
