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
The tools are `train.loggers` classes; `Tracking.stage(prefix)` is the logger a Trainer is given.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
from pathlib import Path
from typing import Callable, Optional

from gpt2tune.errors import UserError
from gpt2tune.train.loggers import LOGGERS, Logger, numbers


def _require(name: str) -> None:
    module, package = LOGGERS[name].needs  # the extra has the same name as the tracker
    if importlib.util.find_spec(module) is None:
        raise UserError(f"train.report_to: {name} needs the package {package}: pip install 'gpt2tune[{name}]'")


def _artifact_files(run_dir: Path) -> list[tuple[Path, str]]:
    """(file, folder inside the tracker's artifacts) for the plots and the resolved recipe."""
    files = [(p, "plots") for p in sorted((run_dir / "plots").glob("*.png"))]
    files += [(p, "plots/pretrain") for p in sorted((run_dir / "pretrain" / "plots").glob("*.png"))]
    if (run_dir / "recipe.yaml").is_file():
        files.append((run_dir / "recipe.yaml", ""))
    return files


# -- one run's trackers ---------------------------------------------------------------------


class Tracking:
    """The trackers of one run folder, started when the first row comes (or by `fit`), shared by the
    stages of a run (classification's pretraining and training). `stage(prefix)` is the logger a
    Trainer is given; `fit(trainer, resume)` trains with the trackers open and closes them (status
    failed on an error, Ctrl-C included); `finish()` logs the artifacts and closes them."""

    def __init__(self, names: list[str], run_dir: Path, recipe: dict, log: Callable[[str], None]):
        self.names, self.run_dir, self.recipe = list(names), Path(run_dir), recipe
        self.say = log  # messages to the user
        self.tools: list[Logger] = []
        self.started = self.closed = False

    def __bool__(self) -> bool:
        return bool(self.names)

    def start(self, resume: bool = False) -> None:
        """Start the tools and give them the recipe; with `resume`, continue the MLflow and W&B runs of
        RUN/tracking.json."""
        if self.started or self.closed:
            return
        self.started = True
        run_name = self.run_dir.resolve().name
        ids_file = self.run_dir / "tracking.json"
        before = json.loads(ids_file.read_text(encoding="utf-8")) if resume and ids_file.is_file() else {}
        try:
            for name in self.names:
                self.tools.append(LOGGERS[name](self.run_dir, run_name, before.get(name)))
                self.tools[-1].log_config(self.recipe)
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
            self.say("tracking: " + ", ".join(f"{t.name} ({t.where})" for t in self.tools))
            ids = {t.name: t.ids() for t in self.tools if hasattr(t, "ids")}
            if ids:  # what --resume continues
                ids_file.write_text(json.dumps(ids, indent=2) + "\n", encoding="utf-8")

    def _each(self, what: str, *args) -> None:
        for tool in list(self.tools):
            try:
                getattr(tool, what)(*args)
            except Exception as err:  # noqa: BLE001 - tracking must not stop a training run
                self.say(f"warning: {tool.name} failed ({type(err).__name__}: {err}); it receives nothing more")
                self.tools.remove(tool)
                try:
                    tool.close(False)
                except Exception:  # noqa: BLE001
                    pass

    def log(self, step: int, split: str, metrics: dict) -> None:
        if not self.names or self.closed:
            return
        self.start()
        values = numbers(metrics)
        if values:
            self._each("log", step, split, values)

    def stage(self, prefix: str = "") -> Logger:
        """The logger of one training stage: its rows under `<prefix><split>/...` (`pretrain/train/loss`)."""
        return _Stage(self, prefix)

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
        for path, folder in _artifact_files(self.run_dir):
            self._each("log_artifact", path, folder)
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
                self.say(f"warning: closing {tool.name} failed: {type(err).__name__}: {err}")
        self.tools = []


class _Stage(Logger):
    """`Tracking.stage(prefix)`: a Trainer's logger; the run's trackers outlive it (closed by `Tracking`)."""

    def __init__(self, tracking: Tracking, prefix: str):
        self.tracking, self.prefix = tracking, prefix
        self.name = f"report_to {prefix}" if prefix else "report_to"

    def log(self, step: int, split: str, metrics: dict) -> None:
        self.tracking.log(step, self.prefix + split, metrics)


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
