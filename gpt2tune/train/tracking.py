"""Experiment tracking: the rows of metrics.jsonl sent to TensorBoard, MLflow, Weights & Biases or Trackio.

`train.report_to: [tensorboard, mlflow, wandb, trackio]`. Every row the Trainer writes to
metrics.jsonl becomes scalars named `<split>/<key>` (`train/loss`, `train/lr`,
`validation/perplexity`, ...) at the row's step; classification's language-model pretraining
logs under `pretrain/`. The resolved recipe goes in as parameters / hyper-parameters (dotted
names: `train.lr`), and at the end the plots (RUN/plots/*.png) and RUN/recipe.yaml as artifacts
where the tool keeps files. Everything is written inside the run folder unless the user points the
tool elsewhere:

| tool | where | elsewhere when |
| --- | --- | --- |
| tensorboard | RUN/tensorboard (`tensorboard --logdir RUN/tensorboard`) | |
| mlflow | a local file store RUN/mlruns (`mlflow ui --backend-store-uri RUN/mlruns`) | MLFLOW_TRACKING_URI is set |
| wandb | offline, in RUN/wandb (`wandb sync RUN/wandb/offline-run-*`) | WANDB_MODE or WANDB_API_KEY is set |
| trackio | RUN/trackio | TRACKIO_DIR is set |

`--resume` goes on in the same MLflow and W&B runs (their ids are kept in RUN/tracking.json); TensorBoard
adds an event file to RUN/tensorboard. Experiment / project names: MLFLOW_EXPERIMENT_NAME, WANDB_PROJECT, else `gpt2tune`; the run is
named after the run folder. Each tool is an optional extra; a missing one is a one-line UserError
naming it. A tool failing while training runs is reported once and dropped: training goes on.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

from gpt2tune.errors import UserError

TRACKERS = ("tensorboard", "mlflow", "wandb", "trackio")
# the module a tracker needs, and the pip package that brings it (the extra has the same name as the tracker)
_NEEDS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow-skinny"),
          "wandb": ("wandb", "wandb"), "trackio": ("trackio", "trackio")}
PROJECT = "gpt2tune"


def scalars(rec: dict, prefix: str = "") -> tuple[int, dict]:
    """(step, {"<prefix><split>/<key>": value}) of one metrics.jsonl row: every number but the step."""
    split = rec.get("split", "train")
    out = {f"{prefix}{split}/{k}": float(v) for k, v in rec.items()
           if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return int(rec.get("step", 0)), out


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


def _require(name: str) -> None:
    module, package = _NEEDS[name]
    if importlib.util.find_spec(module) is None:
        raise UserError(f"train.report_to: {name} needs the package {package}: pip install 'gpt2tune[{name}]'")


def _artifact_files(run_dir: Path) -> list[tuple[Path, str]]:
    """(file, folder inside the tracker's artifacts) for the plots and the resolved recipe."""
    files = [(p, "plots") for p in sorted((run_dir / "plots").glob("*.png"))]
    files += [(p, "plots/pretrain") for p in sorted((run_dir / "pretrain" / "plots").glob("*.png"))]
    if (run_dir / "recipe.yaml").is_file():
        files.append((run_dir / "recipe.yaml", ""))
    return files


# -- the tools ------------------------------------------------------------------------------


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, run_dir: Path, run_name: str, recipe: dict, before: Optional[dict] = None):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.where = str(run_dir / "tensorboard")
        self.writer = SummaryWriter(log_dir=self.where)
        params = flat_params(recipe)
        # the HParams dashboard: the recipe's fields, and the validation metrics they are compared on
        exp, ssi, sei = hparams(params, {"validation/loss": 0.0, "validation/perplexity": 0.0})
        for summary in (exp, ssi, sei):
            self.writer.file_writer.add_summary(summary)
        text = "\n".join(f"    {k}: {v}" for k, v in params.items())  # an indented block: shown as code
        self.writer.add_text("recipe", text)

    def log(self, step: int, values: dict, prefix: str = "") -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def artifacts(self, files: list[tuple[Path, str]]) -> None:
        import numpy as np
        from PIL import Image

        for path, folder in files:
            if path.suffix == ".png":
                with Image.open(path) as im:
                    self.writer.add_image(f"{folder}/{path.stem}", np.asarray(im.convert("RGB")), dataformats="HWC")

    def close(self, ok: bool, interrupted: bool = False) -> None:
        self.writer.close()


class _MLflow:
    name = "mlflow"

    def __init__(self, run_dir: Path, run_name: str, recipe: dict, before: Optional[dict] = None):
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # a local file store in the run folder (MLflow 3 asks for this opt-in to use one)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlruns").resolve().as_uri()
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT
        self.where = uri
        if before and before.get("tracking_uri") == uri and self._reopen(before.get("run_id")):
            return  # --resume: the same MLflow run goes on
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(name)
        self.run_id = self.client.create_run(exp_id, run_name=run_name, tags={"gpt2tune.run_dir": str(run_dir)}).info.run_id
        params = [Param(k, str(v)) for k, v in flat_params(recipe).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

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

    def log(self, step: int, values: dict, prefix: str = "") -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def artifacts(self, files: list[tuple[Path, str]]) -> None:
        for path, folder in files:
            self.client.log_artifact(self.run_id, str(path), folder or None)

    def close(self, ok: bool, interrupted: bool = False) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "KILLED" if interrupted else "FAILED")


class _WandB:
    name = "wandb"

    def __init__(self, run_dir: Path, run_name: str, recipe: dict, before: Optional[dict] = None):
        import wandb

        configured = os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY")
        resume = {"id": before["id"], "resume": "allow"} if before and before.get("id") else {}  # --resume: same run
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or PROJECT, name=run_name, dir=str(run_dir),
                              config=recipe, mode=None if configured else "offline", reinit="create_new", **resume,
                              settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))
        self.where = self.run.dir if configured else str(Path(self.run.dir).parent)
        self.defined: set = set()
        self.wandb = wandb

    def log(self, step: int, values: dict, prefix: str = "") -> None:
        # each stage (training, classification's pretraining) has its own step axis: its "<prefix>step"
        axis = f"{prefix}step"
        if axis not in self.defined:
            self.run.define_metric(axis)
            for split in ("train", "validation"):
                self.run.define_metric(f"{prefix}{split}/*", step_metric=axis)
            self.defined.add(axis)
        self.run.log({axis: step, **values})

    def ids(self) -> dict:
        return {"id": self.run.id}

    def artifacts(self, files: list[tuple[Path, str]]) -> None:
        images = {f"{folder}/{p.stem}": self.wandb.Image(str(p)) for p, folder in files if p.suffix == ".png"}
        if images:
            self.run.log(images)
        for path, _ in files:
            if path.suffix != ".png":  # a copy in the run's files (synced with it)
                shutil.copy2(path, Path(self.run.dir) / path.name)
                self.run.save(str(Path(self.run.dir) / path.name), base_path=self.run.dir, policy="now")

    def close(self, ok: bool, interrupted: bool = False) -> None:
        self.run.finish(exit_code=0 if ok else 130 if interrupted else 1)


class _Trackio:
    name = "trackio"

    def __init__(self, run_dir: Path, run_name: str, recipe: dict, before: Optional[dict] = None):
        os.environ.setdefault("TRACKIO_DIR", str(run_dir / "trackio"))  # read when trackio is first imported
        import trackio

        self.trackio = trackio
        self.where = os.environ["TRACKIO_DIR"]
        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT") or PROJECT, name=run_name, config=recipe)

    def log(self, step: int, values: dict, prefix: str = "") -> None:
        self.trackio.log(values, step=step)

    def artifacts(self, files: list[tuple[Path, str]]) -> None:
        pass  # trackio keeps scalars, tables and media logged with a step; the plots are in RUN/plots

    def close(self, ok: bool, interrupted: bool = False) -> None:
        self.trackio.finish()


_TOOLS = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB, "trackio": _Trackio}


# -- one run's trackers ---------------------------------------------------------------------


class Tracking:
    """The trackers of one run folder. `record` (or `recorder(prefix)`) is the Trainer's `on_record`;
    `fit(trainer, resume)` starts the trackers, trains, and closes them (status failed on an error,
    Ctrl-C included); `finish()` logs the artifacts and closes them."""

    def __init__(self, names: list[str], run_dir: Path, recipe: dict, log: Callable[[str], None]):
        self.names, self.run_dir, self.recipe, self.log = list(names), Path(run_dir), recipe, log
        self.tools: list = []
        self.started = self.closed = False

    def __bool__(self) -> bool:
        return bool(self.names)

    def start(self, resume: bool = False) -> None:
        """Start the tools; with `resume`, continue the MLflow and W&B runs of RUN/tracking.json."""
        if self.started or self.closed:
            return
        self.started = True
        run_name = self.run_dir.resolve().name
        ids_file = self.run_dir / "tracking.json"
        before = json.loads(ids_file.read_text(encoding="utf-8")) if resume and ids_file.is_file() else {}
        try:
            for name in self.names:
                self.tools.append(_TOOLS[name](self.run_dir, run_name, self.recipe, before.get(name)))
        except UserError:
            self._close(ok=False)
            raise
        except Exception as err:  # noqa: BLE001 - a tool that cannot start: a clear line, not a traceback
            self._close(ok=False)
            raise UserError(f"train.report_to: {name} could not start: {type(err).__name__}: {err}") from err
        # registered after the tools' own exit handlers, so it runs before them (atexit runs last-in first-out)
        atexit.unregister(_close_left_open)
        atexit.register(_close_left_open)
        if self.tools:
            self.log("tracking: " + ", ".join(f"{t.name} ({t.where})" for t in self.tools))
            ids = {t.name: t.ids() for t in self.tools if hasattr(t, "ids")}
            if ids:  # what --resume continues
                ids_file.write_text(json.dumps(ids, indent=2) + "\n", encoding="utf-8")

    def _each(self, what: str, *args) -> None:
        for tool in list(self.tools):
            try:
                getattr(tool, what)(*args)
            except Exception as err:  # noqa: BLE001 - tracking must not stop a training run
                self.log(f"warning: {tool.name} failed ({type(err).__name__}: {err}); it receives nothing more")
                self.tools.remove(tool)
                try:
                    tool.close(False)
                except Exception:  # noqa: BLE001
                    pass

    def recorder(self, prefix: str = "") -> Callable[[dict], None]:
        def on_record(rec: dict) -> None:
            if not self.names or self.closed:
                return
            self.start()
            step, values = scalars(rec, prefix)
            if values:
                self._each("log", step, values, prefix)

        return on_record

    def record(self, rec: dict) -> None:
        self.recorder("")(rec)

    def fit(self, trainer, resume: bool = False, finish: bool = True):
        """`trainer.fit(resume=resume)` with the trackers open; closed on an error, and (`finish`) at the end."""
        if not self.names:
            return trainer.fit(resume=resume)
        self.start(resume)
        try:
            result = trainer.fit(resume=resume)
        except BaseException as err:  # Ctrl-C / SIGTERM (TrainingInterrupted): MLflow KILLED, W&B exit code 130
            self._close(ok=False, interrupted=isinstance(err, KeyboardInterrupt)
                        or type(err).__name__ == "TrainingInterrupted")
            raise
        if finish:
            self.finish()
        return result

    def finish(self) -> None:
        """Log the plots and the recipe as artifacts, then close every tracker."""
        if not self.names or self.closed:
            return
        self.start()
        self._each("artifacts", _artifact_files(self.run_dir))
        self._close(ok=True)

    def _close(self, ok: bool, interrupted: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        _OPEN.pop(_key(self.run_dir), None)
        for tool in self.tools:
            try:
                tool.close(ok, interrupted)
            except Exception as err:  # noqa: BLE001
                self.log(f"warning: closing {tool.name} failed: {type(err).__name__}: {err}")
        self.tools = []


_OPEN: dict[str, Tracking] = {}  # run folder -> its trackers (classification's pretraining and training share them)


def _key(run_dir: Path) -> str:
    return str(Path(run_dir).resolve())


def open_tracking(recipe, run_dir: Path, log: Optional[Callable[[str], None]] = None) -> Tracking:
    """The trackers of `recipe.train.report_to` for this run folder (the same object until it is finished).

    Checks that every tool is installed (a UserError naming the extra otherwise); the tools start when
    training starts. On ranks other than 0 (and with an empty report_to) nothing is tracked."""
    from gpt2tune.train import distributed as dist

    names = list(getattr(recipe.train, "report_to", None) or [])
    if not names or not dist.is_main():
        return Tracking([], run_dir, {}, log or print)
    for name in names:
        _require(name)
    key = _key(run_dir)
    if key not in _OPEN or _OPEN[key].closed:
        _OPEN[key] = Tracking(names, run_dir, recipe.model_dump(mode="json"), log or print)
    return _OPEN[key]


def _close_left_open() -> None:
    """A run that failed between training and its end: its trackers are closed as failed."""
    for tracking in list(_OPEN.values()):
        tracking._close(ok=False)
