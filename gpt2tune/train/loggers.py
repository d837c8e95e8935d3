"""Where the rows of a training run go: one interface, one class per place.

A logger takes every row the Trainer records, `log(step, split, metrics)` (split: `train` or
`validation`, with a stage prefix such as `pretrain/train` for classification's language-model
pretraining); the resolved recipe once, `log_config(config)`; files at the end,
`log_artifact(path, folder)`; and `close(ok, interrupted)`. `MetricsFile` (RUN/metrics.jsonl) is
one; TensorBoard, MLflow, Weights & Biases and Trackio (`train.report_to`) are the others, named
in `LOGGERS`. The Trainer writes metrics.jsonl itself and takes a list of further loggers;
`train.tracking` opens the `train.report_to` ones for a run folder and keeps a failing one from
stopping the training.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

PROJECT = "gpt2tune"


class Logger:
    """The interface. Only `log` is required; the others do nothing unless a logger has a use for them."""

    name = "logger"
    where = ""  # shown to the user: where the rows go

    def log(self, step: int, split: str, metrics: dict) -> None:
        raise NotImplementedError

    def log_config(self, config: dict) -> None:
        """The resolved recipe (a dict of the recipe's sections)."""

    def log_artifact(self, path: Path, folder: str = "") -> None:
        """A file of the run (plot, recipe), kept under `folder` where the tool keeps files."""

    def close(self, ok: bool = True, interrupted: bool = False) -> None:
        """The run ended: `ok`, failed, or `interrupted` (Ctrl-C, SIGTERM)."""


def numbers(metrics: dict) -> dict:
    """The numeric values of a row (booleans and strings are left out), as floats."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def scalar_names(split: str, metrics: dict) -> dict:
    """{"<split>/<key>": value} for the numbers of a row: `train/loss`, `pretrain/validation/perplexity`."""
    return {f"{split}/{k}": v for k, v in numbers(metrics).items()}


def flat_params(recipe: dict, prefix: str = "") -> dict:
    """The recipe as {"train.lr": 0.001, ...}: numbers, booleans and strings as they are, the rest as JSON."""
    out: dict = {}
    for k, v in recipe.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flat_params(v, key + "."))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = json.dumps(v, ensure_ascii=False)
    return out


class MetricsFile(Logger):
    """RUN/metrics.jsonl: one JSON row per `log`, flushed at once (a crash loses nothing logged).
    Opened with the rows logged before (on resume, the checkpoint's), which replace the file's: rows
    logged after that checkpoint are trained again."""

    name = "metrics.jsonl"

    def __init__(self, path: Path, rows: list = ()):
        self.where = str(path)
        Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        self.file = open(path, "a", encoding="utf-8")

    def log(self, step: int, split: str, metrics: dict) -> None:
        self.file.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")
        self.file.flush()

    def close(self, ok: bool = True, interrupted: bool = False) -> None:
        self.file.close()


# -- experiment trackers (train.report_to) ------------------------------------------------------
# Each is built with (run_dir, run_name, before): `before` holds the ids its last process kept in
# RUN/tracking.json (`ids()`), so that --resume goes on in the same run.


class TensorBoard(Logger):
    name = "tensorboard"
    needs = ("tensorboard", "tensorboard")  # (module it imports, pip package that brings it)

    def __init__(self, run_dir: Path, run_name: str, before: Optional[dict] = None):
        from torch.utils.tensorboard import SummaryWriter

        self.where = str(run_dir / "tensorboard")
        self.writer = SummaryWriter(log_dir=self.where)

    def log_config(self, config: dict) -> None:
        from torch.utils.tensorboard.summary import hparams

        params = flat_params(config)
        # the HParams dashboard: the recipe's fields, and the validation metrics they are compared on
        for summary in hparams(params, {"validation/loss": 0.0, "validation/perplexity": 0.0}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("recipe", "\n".join(f"    {k}: {v}" for k, v in params.items()))  # indented: shown as code

    def log(self, step: int, split: str, metrics: dict) -> None:
        for k, v in scalar_names(split, metrics).items():
            self.writer.add_scalar(k, v, step)

    def log_artifact(self, path: Path, folder: str = "") -> None:
        import numpy as np
        from PIL import Image

        if path.suffix == ".png":
            with Image.open(path) as im:
                self.writer.add_image(f"{folder}/{path.stem}", np.asarray(im.convert("RGB")), dataformats="HWC")

    def close(self, ok: bool = True, interrupted: bool = False) -> None:
        self.writer.close()


class MLflow(Logger):
    name = "mlflow"
    needs = ("mlflow", "mlflow-skinny")

    def __init__(self, run_dir: Path, run_name: str, before: Optional[dict] = None):
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # a local file store in the run folder (MLflow 3 asks for this opt-in to use one)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlruns").resolve().as_uri()
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.where = uri
        self.resumed = bool(before and before.get("tracking_uri") == uri and self._reopen(before.get("run_id")))
        if not self.resumed:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(name)
            self.run_id = self.client.create_run(exp_id, run_name=run_name,
                                                 tags={"gpt2tune.run_dir": str(run_dir)}).info.run_id

    def _reopen(self, run_id: Optional[str]) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException:
            return False
        self.run_id = run_id
        self.client.update_run(run_id, status="RUNNING")
        return True

    def ids(self) -> dict:
        return {"tracking_uri": self.where, "run_id": self.run_id}

    def log_config(self, config: dict) -> None:
        if self.resumed:  # the run has them (MLflow refuses a parameter logged twice with another value)
            return
        from mlflow.entities import Param

        params = [Param(k, str(v)) for k, v in flat_params(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, step: int, split: str, metrics: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalar_names(split, metrics).items()])

    def log_artifact(self, path: Path, folder: str = "") -> None:
        self.client.log_artifact(self.run_id, str(path), folder or None)

    def close(self, ok: bool = True, interrupted: bool = False) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "KILLED" if interrupted else "FAILED")


class WandB(Logger):
    name = "wandb"
    needs = ("wandb", "wandb")

    def __init__(self, run_dir: Path, run_name: str, before: Optional[dict] = None):
        import wandb

        configured = os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY")
        resume = {"id": before["id"], "resume": "allow"} if before and before.get("id") else {}  # --resume: same run
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or PROJECT, name=run_name, dir=str(run_dir),
                              mode=None if configured else "offline", reinit="create_new", **resume,
                              settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))
        self.where = self.run.dir if configured else str(Path(self.run.dir).parent)
        self.axes: set = set()
        self.wandb = wandb

    def ids(self) -> dict:
        return {"id": self.run.id}

    def log_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log(self, step: int, split: str, metrics: dict) -> None:
        # each stage (training, classification's pretraining) has its own step axis: "<stage/>step"
        stage = split.rpartition("/")[0]
        axis = f"{stage}/step" if stage else "step"
        if split not in self.axes:
            self.run.define_metric(axis)
            self.run.define_metric(f"{split}/*", step_metric=axis)
            self.axes.add(split)
        self.run.log({axis: step, **scalar_names(split, metrics)})

    def log_artifact(self, path: Path, folder: str = "") -> None:
        if path.suffix == ".png":
            self.run.log({f"{folder}/{path.stem}": self.wandb.Image(str(path))})
            return
        shutil.copy2(path, Path(self.run.dir) / path.name)  # a copy in the run's files (synced with it)
        self.run.save(str(Path(self.run.dir) / path.name), base_path=self.run.dir, policy="now")

    def close(self, ok: bool = True, interrupted: bool = False) -> None:
        self.run.finish(exit_code=0 if ok else 130 if interrupted else 1)


class Trackio(Logger):
    name = "trackio"
    needs = ("trackio", "trackio")

    def __init__(self, run_dir: Path, run_name: str, before: Optional[dict] = None):
        os.environ.setdefault("TRACKIO_DIR", str(run_dir / "trackio"))  # read when trackio is first imported
        import trackio

        self.trackio, self.run_name, self.run = trackio, run_name, None
        self.where = os.environ["TRACKIO_DIR"]

    def _start(self, config: Optional[dict]) -> None:
        if self.run is None:  # trackio takes the configuration when the run starts
            self.run = self.trackio.init(project=os.environ.get("TRACKIO_PROJECT") or PROJECT, name=self.run_name,
                                         config=config)

    def log_config(self, config: dict) -> None:
        self._start(config)

    def log(self, step: int, split: str, metrics: dict) -> None:
        self._start(None)
        self.trackio.log(scalar_names(split, metrics), step=step)

    def close(self, ok: bool = True, interrupted: bool = False) -> None:
        if self.run is not None:  # (its plots stay in RUN/plots: trackio keeps media logged with a step)
            self.trackio.finish()


# the trackers of train.report_to (the recipe takes these names; each is an optional extra of the same name)
LOGGERS = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB, "trackio": Trackio}
