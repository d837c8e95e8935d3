"""Checkpoints without pickle: tensors in safetensors, everything else in JSON.

RUN/checkpoints/step-N/
  model.safetensors      trainable parameters
  optimizer.safetensors  optimizer state tensors, keyed "<param name>/<state key>" (fp32; bf16 or
                         uint8 codes + fp32 block scales with train.optimizer adamw_bf16 / adamw_8bit)
  rng.safetensors        torch RNG states
  state.json             step, epoch, position in the epoch, scheduler, optimizer
                         hyper-parameters, Python RNG, metrics so far

RUN/checkpoints/best-step-N/  (train.keep_best)
  model.safetensors      trainable parameters at the best evaluation
  best.json              step, metric and value

A checkpoint is written under a temporary name and renamed when complete, so a crash
mid-write never leaves a broken "latest"; only the newest `keep` are kept. Best snapshots older
than the best a checkpoint records are removed when that checkpoint is written (a resume from it
never needs them), and all but the final best at the end of a run.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt2tune.errors import UserError

_STEP = re.compile(r"^step-(\d+)$")
_BEST = re.compile(r"^best-step-(\d+)$")


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Optional[Path]:
    ck = [p for p in list_checkpoints(root) if (p / "state.json").is_file()]
    return ck[-1] if ck else None


def best_snapshots(root: Path) -> dict[int, Path]:
    if not root.is_dir():
        return {}
    return {int(m.group(1)): p for p in root.iterdir() if p.is_dir() and (m := _BEST.match(p.name))}


def save_best(root: Path, step: int, weights: dict[str, torch.Tensor], info: dict) -> Path:
    """Write RUN/checkpoints/best-step-N (trainable weights + JSON) atomically."""
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"best-step-{step}", root / f".tmp-best-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(weights, str(tmp / "model.safetensors"))
    (tmp / "best.json").write_text(json.dumps(dict(info, step=step)), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    return final


def prune_best(root: Path, keep_from: Optional[int], only: bool = False) -> None:
    """Remove best snapshots older than step `keep_from` (`only`: every one but `keep_from`'s)."""
    for step, path in best_snapshots(root).items():
        if keep_from is None or step < keep_from or (only and step != keep_from):
            shutil.rmtree(path, ignore_errors=True)


def load_best(root: Path, step: int, model) -> None:
    """Copy the trainable weights of best-step-`step` into `model`."""
    path = root / f"best-step-{step}"
    try:
        weights = load_file(str(path / "model.safetensors"))
    except (OSError, SafetensorError) as err:
        raise UserError(f"best checkpoint {path} is unreadable: {err}") from None
    params = dict(model.named_parameters())
    unknown = [n for n in weights if n not in params]
    if unknown:
        raise UserError(f"best checkpoint {path} has parameter {unknown[0]} that this model lacks")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def rng_states() -> dict[str, torch.Tensor]:
    """This process's random states as tensors: torch CPU, every CUDA device, Python's `random`."""
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    _, internal, gauss = random.getstate()
    out["python"] = torch.tensor(internal, dtype=torch.int64)
    out["python.gauss"] = torch.tensor([float("nan") if gauss is None else gauss], dtype=torch.float64)
    return out


def _set_rng_states(rng: dict[str, torch.Tensor], prefix: str) -> None:
    torch.set_rng_state(rng[prefix + "torch"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith(prefix + "cuda."))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    g = float(rng[prefix + "python.gauss"][0])
    random.setstate((3, tuple(int(v) for v in rng[prefix + "python"].tolist()), None if math.isnan(g) else g))


def _state_tensors(model, optimizer) -> tuple[dict, dict, list]:
    """(trainable parameters, optimizer state tensors keyed "<param name>/<key>", the optimizer's
    groups with parameter names) of a model held whole by this process."""
    names = {id(p): n for n, p in model.named_parameters()}
    opt_tensors, groups = {}, []
    for g in optimizer.param_groups:
        hyper = {k: v for k, v in g.items() if k != "params"}
        hyper["params"] = [names[id(p)] for p in g["params"]]
        groups.append(hyper)
        for p in g["params"]:
            for k, v in optimizer.state.get(p, {}).items():
                t = v if torch.is_tensor(v) else torch.tensor(v)
                opt_tensors[f"{names[id(p)]}/{k}"] = t.detach().cpu().contiguous()
    return trainable_state(model), opt_tensors, groups


def full_states(model, optimizer) -> tuple[dict, dict, list]:
    """`_state_tensors` of a model sharded by FSDP: whole tensors gathered to rank 0 (the other ranks
    get empty dicts; every rank must call). Same names and layout, so a checkpoint does not depend
    on how the run was sharded."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    weights = {n: t.contiguous() for n, t in weights.items() if n in trainable}
    opt_tensors = {f"{n}/{k}": (v if torch.is_tensor(v) else torch.tensor(v)).contiguous()
                   for n, st in osd.get("state", {}).items() for k, v in st.items()}
    groups = [dict(g) for g in osd.get("param_groups", [])]
    return weights, opt_tensors, groups


def save_checkpoint(root: Path, step: int, model, optimizer, scheduler, state: dict, keep: int,
                    rank_rngs: Optional[list[dict]] = None, full: Optional[tuple] = None) -> Path:
    """Write RUN/checkpoints/step-N atomically. `rank_rngs`: every rank's `rng_states()` in a
    multi-process run (saved as `rank{r}/...`, so each rank resumes with its own random stream).
    `full`: `full_states()` of a sharded model, gathered beforehand by every rank."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    weights, opt_tensors, groups = full if full is not None else _state_tensors(model, optimizer)
    save_file(weights, str(tmp / "model.safetensors"))
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))

    rng = rng_states()  # this process's; in a multi-process run also every rank's, under rank{r}/
    for r, states in enumerate(rank_rngs or []):
        rng.update({f"rank{r}/{k}": v.contiguous() for k, v in states.items()})
    save_file(rng, str(tmp / "rng.safetensors"))

    full = dict(state)
    full.update(step=step, optimizer_groups=groups, scheduler=scheduler.state_dict())
    (tmp / "state.json").write_text(json.dumps(full), encoding="utf-8")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load_sharded(model, optimizer, weights: dict, opt_tensors: dict, groups: list) -> None:
    """Whole tensors from a checkpoint into an FSDP-sharded model and its optimizer."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=opts)
    state: dict = {}
    for key, t in opt_tensors.items():
        name, k = key.rsplit("/", 1)
        state.setdefault(name, {})[k] = t
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups}, options=opts)


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int = 0, sharded: bool = False) -> dict:
    """Restore model, optimizer, scheduler and RNG states (rank `rank`'s own where the checkpoint
    has per-rank states); return the JSON state. `sharded`: the model is sharded by FSDP, every
    rank reads the whole checkpoint and keeps its own shards."""
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        weights = load_file(str(path / "model.safetensors"))
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        rng = load_file(str(path / "rng.safetensors"))
    except (OSError, ValueError, json.JSONDecodeError, SafetensorError) as err:  # missing, truncated, not safetensors
        raise UserError(f"checkpoint {path} is unreadable: {err}") from None
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing:
        raise UserError(f"checkpoint {path} does not match this model/method (missing {missing[0]} ...)")
    unknown = [n for n in weights if n not in params]
    if unknown:
        raise UserError(f"checkpoint {path} has parameter {unknown[0]} that this model lacks")
    if sharded:
        _load_sharded(model, optimizer, weights, opt_tensors, state["optimizer_groups"])
    else:
        with torch.no_grad():
            for n, t in weights.items():
                params[n].copy_(t)
    if not sharded and len(state["optimizer_groups"]) != len(optimizer.param_groups):
        raise UserError(f"checkpoint {path}: optimizer groups differ from this run's")
    for g, saved in zip([] if sharded else optimizer.param_groups, state["optimizer_groups"]):
        theirs, mine = saved.get("optimizer", "adamw"), g.get("optimizer", "adamw")  # (torch's AdamW: no key)
        if theirs != mine:  # the state tensors are of another format
            raise UserError(f"checkpoint {path} holds the state of train.optimizer {theirs}, this run uses {mine}; "
                            f"resume with the same train.optimizer")
    for g, saved in zip([] if sharded else optimizer.param_groups, state["optimizer_groups"]):
        for k, v in saved.items():
            if k != "params":
                g[k] = tuple(v) if isinstance(v, list) else v
        for p, name in zip(g["params"], saved["params"]):
            st = {}
            prefix = name + "/"
            for key, t in opt_tensors.items():
                if key.startswith(prefix):
                    k = key[len(prefix):]
                    st[k] = t if k == "step" else t.to(p.device)
            if st:
                optimizer.state[p] = st
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_states(rng, f"rank{rank}/" if f"rank{rank}/torch" in rng else "")
    return state
