"""`bench/run.py` keeps working: a one-step smoke run on the mini model (speed is not asserted).

Its rows follow the machine: fp32 where the CPU has no native bf16 (bf16 is emulated there, many
times slower, so the bench would not finish), bf16 rows only where bf16 is native."""

import json
import re
import subprocess
import sys
from pathlib import Path

from gpt2tune.model.cpu import cpu_has_bf16

ROOT = Path(__file__).resolve().parents[1]


def test_bench_smoke_prints_one_ratio_line_per_workload(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--size", "mini", "--only", "full,decode",
                        "--steps", "1", "--new-tokens", "4", "--threads", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    native = cpu_has_bf16()
    prec = "bf16" if native else "fp32"
    cpu_line = lines[1].removesuffix(" (native bf16 set by GPT2TUNE_CPU_BF16)")  # the override says so
    assert cpu_line.startswith("cpu: ") and cpu_line.endswith(f"precision auto = {prec}"), lines[1]
    assert lines[2].startswith("ceilings: ") and ("bf16 matmul" in lines[2]) == native, lines[2]
    rows = [line for line in lines if re.search(r"\| (HF|CT2) .*\| gpt2tune .*\|\s+\d+\.\d\dx", line)]
    names = [line.split("|")[0].strip() for line in rows]
    want = ["full fine-tuning vs HF fp32 (tok/s)", "full fine-tuning peak memory (MiB)",
            "greedy decode bs1 4 tokens (tok/s)", "greedy decode bs1 int8 weights (tok/s)",
            "sampling bs8 int8 weights (tok/s)"]
    if native:
        want.append("full fine-tuning vs HF bf16 autocast (tok/s)")
    else:
        assert not any("bf16 autocast" in n for n in names), names
    try:
        import ctranslate2  # noqa: F401

        want += ["greedy decode bs1 fp32 vs CTranslate2 float32 (tok/s)",
                 "greedy decode bs1 int8 weights vs CTranslate2 int8 (tok/s)"]
    except ImportError:
        pass
    for w in want:
        assert w in names, (w, names)
    assert "same tokens as HF: True" in r.stdout
    res = json.loads(out.read_text())["results"]
    assert res["full"]["precision"] == prec and res["full"][f"ours_{prec}"] > 0
    assert set(res["full"]["peak_rss_mib"]) == ({"hf32", "hfbf", "ours"} if native else {"hf32", "ours"})
    assert res["decode"]["greedy_same"] is True
    split = res["decode"]["step_breakdown"]  # where a greedy step's time goes, printed for every run
    assert split["step_ms"] > 0 and split["products_ms"] > 0 and "greedy fp32 step (" in r.stdout and split["kernel"] in ("compiled", "torch")
