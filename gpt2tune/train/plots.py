"""Training plots from metrics.jsonl records (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(records: list[dict], out_dir: Path) -> list[Path]:
    """plots/loss.png (train and validation loss) and plots/accuracy.png (validation accuracy)."""
    plt = _plt()
    out_dir.mkdir(parents=True, exist_ok=True)
    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "validation"]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.2))
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", color="tab:blue", alpha=0.8)
    if val:
        ax.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="validation", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=110)
    plt.close(fig)
    written.append(out_dir / "loss.png")

    fig, ax = plt.subplots(figsize=(7, 4.2))
    if train and "accuracy" in train[0]:
        ax.plot([r["step"] for r in train], [r["accuracy"] for r in train], label="train", color="tab:blue", alpha=0.8)
    if val:
        ax.plot([r["step"] for r in val], [r["accuracy"] for r in val], "o-", label="validation", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("next-token accuracy")
    ax.set_title("Accuracy (non-pad tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "accuracy.png", dpi=110)
    plt.close(fig)
    written.append(out_dir / "accuracy.png")
    return written
