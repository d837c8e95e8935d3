"""What `compare` and `sweep` share: training recipes one by one, each in its own process, in one
output folder, and reporting the results as Markdown / CSV tables.

A job is a JSON file (`DIR/.jobs/NAME.job.json`) that `python -m gpt2tune.tasks.compare JOB` runs
(`gpt2tune.tasks.compare.work`: train the recipe, measure the process's peak memory, ...); its
result is written beside it. Its own process gives each run its own memory high-water mark and
leaves nothing behind in the parent (threads, allocator caches, global state).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

from gpt2tune.errors import UserError

WORKER = "gpt2tune.tasks.compare"  # the module whose __main__ runs a job file


def run_job(job: dict, job_path: Path, label: str, log, who: str = "compare") -> dict:
    """Write the job, run it in a fresh Python process, return its result (UserError if it failed)."""
    job_path.write_text(json.dumps(job, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log(f"{who}: {label} ...")
    proc = subprocess.run([sys.executable, "-m", WORKER, str(job_path)], env=env)
    if proc.returncode != 0:
        raise UserError(f"{who}: {label} failed (exit code {proc.returncode}); see the messages above")
    return json.loads(Path(job["result"]).read_text(encoding="utf-8"))


def prepare_output(folder: Path, overwrite: bool, what: str = "comparison") -> None:
    """An empty output folder: refuse to replace earlier results without --overwrite."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--output {folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()):
        if not overwrite:
            raise UserError(f"--output {folder} already holds files (an earlier {what}?); pass --overwrite "
                            f"to replace it or choose another --output")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)


def cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return fmt.format(value)


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format) each."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(k), f) for k, _, f in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
