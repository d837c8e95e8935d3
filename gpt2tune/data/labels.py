"""Labelled text for classification: read (text, label) pairs, map label names to ids,
balance classes, split train/validation/test stratified by label, and batch.

Every random choice is a pure function of the seed. Label ids follow the sorted label
names (`ham`=0, `spam`=1), so the same data always gives the same `id2label`.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from gpt2tune.data import sources
from gpt2tune.data.clean import clean_text, length_ok
from gpt2tune.data.dataset import pad_rows
from gpt2tune.errors import UserError

DEFAULT_SPLIT = (0.7, 0.1, 0.2)


@dataclass
class Labeled:
    texts: list[str]
    labels: list[str]
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: Sequence[int]) -> "Labeled":
        return Labeled([self.texts[i] for i in idx], [self.labels[i] for i in idx])

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(self.labels).items()))


class Example(list):
    """A token row (a list of ids, so batching code can measure and sort it) with its label id."""

    def __init__(self, ids, label: int):
        super().__init__(ids)
        self.label = int(label)


# --------------------------------------------------------------------------- reading


def _label_value(v) -> Optional[str]:
    if v is None or isinstance(v, (list, dict)):
        return None
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    s = str(v).strip()
    return s or None


def labeled_from_records(records: list[dict], text_field: str, label_field: str, spec: str,
                         normalize: str = "nfc", whitespace: bool = True, min_chars: int = 1,
                         max_chars: Optional[int] = None) -> Labeled:
    """(text, label) pairs from a source's records; records without either are skipped and counted."""
    if not records:
        raise UserError(f"{spec}: no records")
    first = records[0]
    for name, what in ((text_field, "data.field (the text)"), (label_field, "classification.label_field (the label)")):
        if name not in first:
            have = ", ".join(map(str, first.keys()))
            raise UserError(f"{spec}: no field/column {name!r} for {what}; available: {have}")
    texts, labels = [], []
    stats = {"records": len(records), "missing_label": 0, "missing_text": 0, "too_short": 0, "too_long": 0}
    for r in records:
        lab = _label_value(r.get(label_field))
        t = r.get(text_field)
        if lab is None:
            stats["missing_label"] += 1
            continue
        if t is None or isinstance(t, (list, dict)):
            stats["missing_text"] += 1
            continue
        t = clean_text(str(t), normalize, whitespace)
        if not length_ok(t, min_chars, max_chars, stats):
            continue
        texts.append(t)
        labels.append(lab)
    if not texts:
        raise UserError(f"{spec}: no usable (text, label) pairs (after cleaning: {stats})")
    return Labeled(texts, labels, stats)


def read_labeled(data_cfg, spec: str, label_field: str = "label") -> Labeled:
    """Read a source named by `spec` with the options of a recipe's `data` section, the label in
    `label_field` (classification.label_field)."""
    loaded = sources.load_source(spec, sources.SourceOptions.of(data_cfg))
    out = labeled_from_records(loaded.records, data_cfg.field, label_field, spec, data_cfg.normalize,
                               data_cfg.whitespace, data_cfg.min_chars, data_cfg.max_chars)
    out.stats["skipped_records"] = loaded.skipped
    if loaded.notes:
        out.stats["notes"] = loaded.notes
    return out


# --------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class LabelMap:
    names: tuple[str, ...]

    @classmethod
    def from_labels(cls, labels: Sequence[str], where: str = "the training data") -> "LabelMap":
        names = sorted(set(labels))
        if len(names) < 2:
            only = names[0] if names else "none"
            raise UserError(f"{where} has a single class ({only!r}); classification needs at least two labels")
        return cls(tuple(names))

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    def encode(self, labels: Sequence[str], where: str) -> list[int]:
        ids = self.label2id
        unseen = sorted(set(labels) - set(ids))
        if unseen:
            raise UserError(f"{where} has label(s) never seen in training: {', '.join(map(repr, unseen))} "
                            f"(training labels: {', '.join(self.names)})")
        return [ids[l] for l in labels]


# --------------------------------------------------------------------------- balance and split


def undersample(data: Labeled, seed: int) -> Labeled:
    """Keep a random `min class count` examples of every class (seeded); order is shuffled."""
    rng = random.Random(f"undersample:{seed}")
    by_class: dict[str, list[int]] = {}
    for i, l in enumerate(data.labels):
        by_class.setdefault(l, []).append(i)
    if len(by_class) < 2:
        LabelMap.from_labels(data.labels, "the data")  # raises the single-class error
    n = min(len(v) for v in by_class.values())
    keep: list[int] = []
    for name in sorted(by_class):
        keep += rng.sample(by_class[name], n)
    rng.shuffle(keep)
    out = data.subset(keep)
    out.stats = dict(data.stats)
    return out


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or fractions[0] <= 0:
        raise UserError(f"classification.split must be three fractions [train, validation, test] with train > 0, got {list(fractions)}")
    total = sum(fractions)
    if abs(total - 1.0) > 1e-6:
        raise UserError(f"classification.split fractions must add up to 1, got {list(fractions)} (sum {total:g})")
    return tuple(float(f) for f in fractions)


def _part_sizes(n: int, f_val: float, f_test: float) -> tuple[int, int]:
    """Validation and test counts of a class of `n` samples (rounded; train keeps at least one)."""
    n_test = int(round(n * f_test))
    n_val = int(round(n * f_val))
    if n_test + n_val >= n:
        n_val = max(0, n - 1 - n_test)
        n_test = min(n_test, n - 1)
    return n_val, n_test


def _fills(n: int, f_val: float, f_test: float) -> bool:
    """Whether a class of `n` samples gets a validation and a test sample where the split asks for them."""
    return all(k >= 1 for k, f in zip(_part_sizes(n, f_val, f_test), (f_val, f_test)) if f > 0)


def _min_per_class(f_val: float, f_test: float) -> int:
    """The smallest class size that `_fills` the split (no smaller n can round a fraction f up to 1 below 0.5/f)."""
    n = max([1] + [int(0.5 / f) for f in (f_val, f_test) if f > 0])
    while not _fills(n, f_val, f_test):
        n += 1
    return n


def stratified_split(labels: Sequence[str], fractions: Sequence[float], seed: int,
                     shown: Optional[Sequence[float]] = None, after: str = "") -> tuple[list[int], list[int], list[int]]:
    """Indices of train/validation/test: every class is cut in the same proportions (seeded).

    Per class, the validation and test counts are rounded from the fractions; train gets
    the rest. Each part is shuffled. A class too small to get a validation or test sample
    (where its fraction is > 0) is a UserError: the run would measure that class, or with
    tiny data anything, on training data only. `shown` is the classification.split the error names
    (default `fractions`), `after` says where the class counts come from.
    """
    f_train, f_val, f_test = check_fractions(fractions)
    rng = random.Random(f"split:{seed}")
    by_class: dict[str, list[int]] = {}
    for i, l in enumerate(labels):
        by_class.setdefault(l, []).append(i)
    small = [(name, len(idx)) for name, idx in sorted(by_class.items()) if not _fills(len(idx), f_val, f_test)]
    if small:
        need = _min_per_class(f_val, f_test)
        parts = " and ".join(p for p, f in (("validation", f_val), ("test", f_test)) if f > 0)
        have = ", ".join(f"class {name!r} has {n} sample{'s' if n != 1 else ''}" for name, n in small)
        split = [round(f, 4) for f in (shown if shown is not None else fractions)]
        raise UserError(f"{have}{after}; classification.split {split} needs at least {need} per class for non-empty {parts}; "
                        f"add data or change classification.split")
    train, val, test = [], [], []
    for name in sorted(by_class):
        idx = by_class[name]
        rng.shuffle(idx)
        n_val, n_test = _part_sizes(len(idx), f_val, f_test)
        test += idx[:n_test]
        val += idx[n_test:n_test + n_val]
        train += idx[n_test + n_val:]
    for part in (train, val, test):
        rng.shuffle(part)
    return train, val, test


# --------------------------------------------------------------------------- batches


def collate_examples(rows: list[Example], pad_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    """Pad token rows to the longest (right padding by default); labels are the class ids."""
    ids, mask = pad_rows(rows, pad_id, left)
    labels = torch.tensor([r.label for r in rows], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
