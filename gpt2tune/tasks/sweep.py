"""`gpt2tune sweep`: train one recipe at several settings and find the best.

The points are a grid (`--grid train.lr=1e-4,3e-4,1e-3 --grid method.rank=4,16`: every combination)
or `--random N` draws from the same specs, where a spec may also be a range `LOW:HIGH` (uniform),
`LOW:HIGH:log` (log-uniform) or, with integer bounds, integers. In a grid a range needs a number
of points: `train.lr=1e-5:1e-3:log:5`. A value is anything `--set` accepts for the field.

Each point is a normal run in DIR/<point>/ (the recipe, the user's --set overrides and the point's
values; output.dir moved there), trained in its own process by the worker `compare` uses
(gpt2tune.tasks.jobs). A point that fails (a diverging learning rate stops its run) is kept in the
table as failed; the sweep goes on. The metric is read from each run's eval.json
(`validation perplexity`, `validation loss`, classification's `validation accuracy` / `macro_f1`,
...). Writes DIR/sweep.md, .csv, .json, sweep.png (the metric against each swept field, the best
point marked) and DIR/best.yaml: the best run's resolved recipe with the recipe's own output.dir,
ready for `gpt2tune train DIR/best.yaml` (raise its budget to train in full).
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from gpt2tune.errors import UserError
from gpt2tune.tasks import jobs

LOWER_IS_BETTER = ("loss", "perplexity", "errors")
HIGHER_IS_BETTER = ("accuracy", "macro_f1", "f1", "precision", "recall", "reward_accuracy", "reward_margin")
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


@dataclass
class Axis:
    """One swept field: a list of values, or a range (for --random, or a grid with `count` points)."""

    field: str
    values: list = field(default_factory=list)  # as written (strings), when a list
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    integer: bool = False
    count: Optional[int] = None

    @property
    def is_range(self) -> bool:
        return self.low is not None

    def grid_values(self) -> list[str]:
        if not self.is_range:
            return self.values
        if not self.count:
            raise UserError(f"--grid {self.field}: a range LOW:HIGH needs --random N, or a number of points in a "
                            f"grid, e.g. {self.field}={_fmt(self.low)}:{_fmt(self.high)}{':log' if self.log else ''}:5")
        k = self.count
        if k == 1:
            pts = [self.low]
        elif self.log:
            a, b = math.log(self.low), math.log(self.high)
            pts = [math.exp(a + (b - a) * i / (k - 1)) for i in range(k)]
        else:
            pts = [self.low + (self.high - self.low) * i / (k - 1) for i in range(k)]
        out = [str(int(round(v))) if self.integer else _fmt(v) for v in pts]
        return list(dict.fromkeys(out))

    def draw(self, rng: random.Random) -> str:
        if not self.is_range:
            return rng.choice(self.values)
        if self.log:
            v = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            v = rng.uniform(self.low, self.high)
        return str(int(round(v))) if self.integer else _fmt(v)


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _split_values(text: str) -> list[str]:
    """Comma-separated values; commas inside [...] or {...} belong to the value (train.betas=[0.9,0.99])."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return out


def parse_axis(spec: str) -> Axis:
    if "=" not in spec:
        raise UserError(f"--grid expects FIELD=V1,V2,... or FIELD=LOW:HIGH[:log], got {spec!r}")
    name, rest = (s.strip() for s in spec.split("=", 1))
    if not name or any(not p for p in name.split(".")):
        raise UserError(f"--grid: bad field name {name!r}")
    parts = rest.split(":")
    if "," not in rest and 2 <= len(parts) <= 4 and _NUMBER.match(parts[0]) and _NUMBER.match(parts[1]):
        low, high = float(parts[0]), float(parts[1])
        axis = Axis(name, low=low, high=high, integer=not any(c in parts[0] + parts[1] for c in ".eE"))
        for flag in parts[2:]:
            if flag == "log":
                axis.log = True
            elif flag in ("lin", "linear"):
                axis.log = False
            elif flag == "int":
                axis.integer = True
            elif flag.isdigit() and int(flag) > 0:
                axis.count = int(flag)
            else:
                raise UserError(f"--grid {name}: unknown range option {flag!r} (log, lin, int or a number of points)")
        if not high > low:
            raise UserError(f"--grid {name}: a range needs LOW < HIGH, got {parts[0]}:{parts[1]}")
        if axis.log and low <= 0:
            raise UserError(f"--grid {name}: a log range needs LOW > 0, got {parts[0]}")
        return axis
    values = _split_values(rest)
    if any(v == "" for v in values):
        raise UserError(f"--grid {name}: an empty value in {rest!r}")
    if len(set(values)) != len(values):
        raise UserError(f"--grid {name}: a value is listed twice ({rest})")
    return Axis(name, values=values)


def parse_metric(text: Optional[str], task: str) -> tuple[str, str]:
    """'validation perplexity' / 'validation.perplexity' / 'perplexity' -> ('validation', 'perplexity')."""
    if not text:
        return "validation", {"classification": "accuracy", "preference": "reward_accuracy"}.get(task, "perplexity")
    words = [w for w in re.split(r"[\s./]+", text.strip()) if w]
    if len(words) == 1:
        return "validation", words[0]
    if len(words) == 2:
        return words[0], words[1]
    raise UserError(f"--metric expects 'SPLIT NAME' such as 'validation perplexity', got {text!r}")


def metric_mode(key: str, mode: Optional[str]) -> str:
    if mode:
        return mode
    if key in LOWER_IS_BETTER:
        return "min"
    if key in HIGHER_IS_BETTER:
        return "max"
    raise UserError(f"--metric {key}: is lower or higher better? pass --mode min or --mode max")


def _number(value: str):
    return float(value) if _NUMBER.match(value) else value


def _point_name(i: int, values: dict) -> str:
    short = {f: f.split(".")[-1] for f in values}
    if len(set(short.values())) < len(short):
        short = {f: f for f in values}
    text = "_".join(f"{short[f]}={v}" for f, v in values.items())
    return f"{i:02d}-" + re.sub(r"[^A-Za-z0-9._=+-]", "-", text)[:60]


def plan_points(axes: list[Axis], random_n: Optional[int], seed: int) -> list[dict]:
    """The points, each {field: value as written}."""
    fields = [a.field for a in axes]
    if len(set(fields)) != len(fields):
        raise UserError(f"--grid: a field is swept twice ({', '.join(fields)})")
    if random_n is not None:
        if random_n < 1:
            raise UserError("--random N needs N >= 1")
        rng = random.Random(seed)
        points, seen = [], set()
        for _ in range(random_n * 20):  # lists may hold fewer distinct combinations than N
            p = {a.field: a.draw(rng) for a in axes}
            key = tuple(p.values())
            if key not in seen:
                seen.add(key)
                points.append(p)
            if len(points) == random_n:
                break
        return points
    return [dict(zip(fields, combo)) for combo in itertools.product(*(a.grid_values() for a in axes))]


# -- running ----------------------------------------------------------------------------------


def sweep(raw: dict, grid: list[str], sets: list[str] = (), output: Optional[str] = None,
          random_n: Optional[int] = None, seed: Optional[int] = None, metric: Optional[str] = None,
          mode: Optional[str] = None, overwrite: bool = False, progress: bool = True, dry_run: bool = False,
          log=None) -> dict:
    from gpt2tune.recipe import apply_overrides, recipe_from_dict
    from gpt2tune.tasks.common import log as default_log

    log = log or default_log
    base = recipe_from_dict(raw, list(sets))
    if not grid:
        raise UserError("sweep needs at least one --grid FIELD=V1,V2,... (or a range with --random N)")
    axes = [parse_axis(g) for g in grid]
    split, key = parse_metric(metric, base.task)
    mode = metric_mode(key, mode)
    points = plan_points(axes, random_n, base.train.seed if seed is None else seed)
    folder = Path(output or base.output.dir.rstrip("/") + "-sweep")
    names = [_point_name(i, p) for i, p in enumerate(points, 1)]
    recipes = {}
    for name, p in zip(names, points):  # every point checked before anything trains
        over = list(sets) + [f"{f}={v}" for f, v in p.items()] + [f"output.dir={folder / name}"]
        try:
            recipe_from_dict(raw, over)
        except UserError as err:
            raise UserError(f"sweep point {', '.join(f'{f}={v}' for f, v in p.items())}: {err}") from None
        recipes[name] = apply_overrides(raw, over)
    fields = [a.field for a in axes]
    log(f"sweep: {len(points)} points over {', '.join(fields)}; metric {split} {key} ({mode}imum is best)")
    if dry_run:
        return {"folder": str(folder), "points": [dict(point=n, **p) for n, p in zip(names, points)],
                "table": jobs.markdown_table([dict(point=n, **p) for n, p in zip(names, points)],
                                             [("point", "point", "{}")] + [(f, f, "{}") for f in fields])}

    jobs.prepare_output(folder, overwrite, "sweep")
    work_dir = folder / ".jobs"
    work_dir.mkdir()
    rows = []
    for i, (name, p) in enumerate(zip(names, points), 1):
        job = {"mode": "train", "recipe": recipes[name], "progress": progress,
               "result": str(work_dir / f"{name}.result.json")}
        label = f"[{i}/{len(points)}] " + ", ".join(f"{f}={v}" for f, v in p.items())
        row = {"point": name, **{f: _number(v) for f, v in p.items()}}
        try:
            res = jobs.run_job(job, work_dir / f"{name}.job.json", label, log, who="sweep")
        except UserError as err:
            log(f"sweep: {err}; the sweep goes on")
            rows.append({**row, "metric": None, "status": "failed"})
            continue
        rep = res["report"]
        part = rep.get(split)
        if not isinstance(part, dict) or key not in part:
            have = sorted(f"{s} {k}" for s, v in rep.items() if isinstance(v, dict)
                          for k, x in v.items() if isinstance(x, (int, float)))
            raise UserError(f"--metric {split} {key}: not in {folder / name}/eval.json; available: {', '.join(have)}")
        value = float(part[key])
        row.update(metric=value if math.isfinite(value) else None, status="ok" if math.isfinite(value) else "non-finite",
                   steps=rep.get("steps"), seconds_per_step=rep.get("train_seconds", 0) / max(rep.get("steps") or 1, 1),
                   peak_rss_mb=res["peak_rss_bytes"] / 2**20)
        for k in ("loss", "perplexity", "accuracy", "macro_f1"):
            if k != key and isinstance(part.get(k), (int, float)):
                row[f"{split}_{k}"] = part[k]
        rows.append(row)
        log(f"sweep: {name}: {split} {key} {value:.4g}")

    done = [r for r in rows if r["metric"] is not None]
    if not done:
        raise UserError(f"sweep: every point failed; see the messages above and {folder}/*/")
    best = (min if mode == "min" else max)(done, key=lambda r: r["metric"])
    settings = {"recipe_task": base.task, "fields": fields, "kind": "random" if random_n is not None else "grid",
                "random": random_n, "seed": base.train.seed if seed is None else seed, "grid": list(grid),
                "set": list(sets), "metric": f"{split} {key}", "mode": mode}
    table = write_reports(folder, rows, fields, settings, best, base.output.dir)
    return {"folder": str(folder), "rows": rows, "best": best, "table": table}


def write_reports(folder: Path, rows: list[dict], fields: list[str], settings: dict, best: dict,
                  out_dir: str) -> str:
    label = settings["metric"]
    extra = [k for k in dict.fromkeys(k for r in rows for k in r) if k.startswith(label.split()[0] + "_")]
    columns = ([("point", "point", "{}")] + [(f, f, "{:g}" if all(isinstance(r[f], float) for r in rows) else "{}")
                                             for f in fields]
               + [("metric", label, "{:.4g}")] + [(k, k.replace("_", " "), "{:.4g}") for k in extra]
               + [("steps", "steps", "{}"), ("seconds_per_step", "s/step", "{:.3f}"),
                  ("peak_rss_mb", "peak RSS MB", "{:.0f}"), ("status", "status", "{}")])
    shown = [dict(r, status="best" if r is best else r["status"]) for r in rows]
    table = jobs.markdown_table(shown, columns)
    values = ", ".join(f"{f}={best[f]:g}" if isinstance(best[f], float) else f"{f}={best[f]}" for f in fields)
    text = [f"# Sweep: {', '.join(fields)}", "",
            f"{len(rows)} points ({settings['kind']}{', seed ' + str(settings['seed']) if settings['kind'] == 'random' else ''}), "
            f"metric **{label}** ({settings['mode']}imum is best), each trained in its own process in "
            f"`{folder}/<point>/`." + (f" Overrides for every point: `{' '.join(settings['set'])}`." if settings["set"] else ""),
            "", table, "",
            f"**Best: {best['point']}** ({values}): {label} {best['metric']:.4g}. Its resolved recipe is `best.yaml` "
            f"(output.dir {out_dir}): `gpt2tune train {folder / 'best.yaml'}`."]
    failed = [r["point"] for r in rows if r["status"] != "ok"]
    if failed:
        text.append(f"\nFailed or non-finite: {', '.join(failed)} (see their run folders).")
    (folder / "sweep.md").write_text("\n".join(text) + "\n", encoding="utf-8")
    jobs.write_csv(folder / "sweep.csv", rows)
    (folder / "sweep.json").write_text(json.dumps({"settings": settings, "best": best, "points": rows}, indent=2,
                                                  ensure_ascii=False) + "\n", encoding="utf-8")
    resolved = yaml.safe_load((folder / best["point"] / "recipe.yaml").read_text(encoding="utf-8"))
    resolved.setdefault("output", {})["dir"] = out_dir
    (folder / "best.yaml").write_text(f"# best point of the sweep in {folder}: {values} ({label} {best['metric']:.4g})\n"
                                      + yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True), encoding="utf-8")
    plot_sweep(rows, fields, label, settings["mode"], best, folder / "sweep.png")
    return table


def plot_sweep(rows: list[dict], fields: list[str], label: str, mode: str, best: dict, path: Path) -> None:
    """One panel per swept field: the metric against its values (lines join the points whose other
    fields are equal), the best point starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["metric"] is not None]
    fig, axes = plt.subplots(1, len(fields), figsize=(6.4 * len(fields), 4.4), squeeze=False)
    metrics = [r["metric"] for r in done]
    for ax, f in zip(axes[0], fields):
        numeric = all(isinstance(r[f], float) for r in rows)
        cats = list(dict.fromkeys(str(r[f]) for r in rows))
        x = (lambda r: r[f]) if numeric else (lambda r: cats.index(str(r[f])))  # noqa: E731
        others = [g for g in fields if g != f]
        groups: dict = {}
        for r in done:
            groups.setdefault(tuple(r[g] for g in others), []).append(r)
        many = len(groups) > 8  # random draws: points, not lines
        for key, grp in groups.items():
            grp = sorted(grp, key=x)
            name = ", ".join(f"{g.split('.')[-1]}={v:g}" if isinstance(v, float) else f"{g.split('.')[-1]}={v}"
                             for g, v in zip(others, key)) or None
            ax.plot([x(r) for r in grp], [r["metric"] for r in grp], "o" if many else "o-", color="tab:blue" if many else None,
                    label=None if many else name, alpha=0.8)
        ax.plot([x(best)], [best["metric"]], "*", ms=18, color="tab:red", zorder=5,
                label=f"best: {best['metric']:.4g}")
        for r in rows:
            if r["metric"] is None:
                ax.axvline(x(r), color="gray", ls=":", alpha=0.6)
        if numeric and all(r[f] > 0 for r in rows) and max(r[f] for r in rows) >= 10 * min(r[f] for r in rows):
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(cats)), cats, rotation=20)
        if metrics and min(metrics) > 0 and max(metrics) >= 10 * min(metrics):
            ax.set_yscale("log")
        ax.set_xlabel(f)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    failed = len(rows) - len(done)
    fig.suptitle(f"Sweep: {label} ({mode}imum is best)" + (f"; {failed} failed (dotted)" if failed else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
