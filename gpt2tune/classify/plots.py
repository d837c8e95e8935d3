"""Classification plots (matplotlib, no display needed).

- `loss.png` and `accuracy.png`: train and validation per epoch, with a second x-axis on
  top counting the training examples seen (the figure of "LLMs from scratch", ch. 6).
- `confusion-matrix.png`: counts, true class per row, predicted class per column.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(records: list[dict], steps_per_epoch: int, examples_per_epoch: int, out_dir: Path) -> list[Path]:
    """Loss and accuracy per epoch from Trainer records (split train/validation)."""
    plt = _plt()
    out_dir.mkdir(parents=True, exist_ok=True)
    spe = max(1, steps_per_epoch)
    per_ex = max(1, examples_per_epoch)
    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "validation"]
    written = []
    for key, ylabel, name in (("loss", "cross-entropy loss", "loss.png"), ("accuracy", "accuracy", "accuracy.png")):
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        if train:
            ax.plot([r["step"] / spe for r in train], [r[key] for r in train], label=f"training (running {key})",
                    color="tab:blue", alpha=0.85)
        if val:
            ax.plot([r["step"] / spe for r in val], [r[key] for r in val], "o-.", label="validation",
                    color="tab:orange")
        ax.set_xlabel("epochs")
        ax.set_ylabel(ylabel)
        if key == "accuracy":
            ax.set_ylim(min(0.45, ax.get_ylim()[0]), 1.01)
        ax.grid(alpha=0.3)
        ax.legend()
        top = ax.secondary_xaxis("top", functions=(lambda e, k=per_ex: e * k, lambda x, k=per_ex: x / k))
        top.set_xlabel("examples seen")
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(out_dir / name)
    return written


def plot_confusion(matrix: Sequence[Sequence[int]], names: Sequence[str], path: Path, title: str = "") -> Path:
    plt = _plt()
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(names)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.8, 1.2 * n + 2.2))
    ax.imshow(matrix, cmap="Blues")
    top = max((max(r) for r in matrix), default=0)
    for i in range(n):
        for j in range(n):
            v = matrix[i][j]
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    ax.set_xticks(range(n), labels=list(names))
    ax.set_yticks(range(n), labels=list(names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
