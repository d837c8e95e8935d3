"""`bench/run.py` keeps working: a one-step smoke run on the mini model (speed is not asserted)."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_smoke_prints_one_ratio_line_per_workload(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--size", "mini", "--only", "full,decode",
                        "--steps", "1", "--new-tokens", "4", "--threads", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert lines[1].startswith("ceilings: bf16 matmul")
    rows = [line for line in lines if re.search(r"\| HF .*\| gpt2tune .*\|\s+\d+\.\d\dx", line)]
    names = [line.split("|")[0].strip() for line in rows]
    for want in ("full fine-tuning vs HF fp32 (tok/s)", "full fine-tuning vs HF bf16 autocast (tok/s)",
                 "full fine-tuning peak memory (MiB)", "greedy decode bs1 4 tokens (tok/s)",
                 "greedy decode bs1 int8 weights (tok/s)", "sampling bs8 int8 weights (tok/s)"):
        assert want in names, (want, names)
    assert "same tokens as HF: True" in r.stdout
    res = json.loads(out.read_text())["results"]
    assert res["full"]["ours_bf16"] > 0 and set(res["full"]["peak_rss_mib"]) == {"hf32", "hfbf", "ours"}
    assert res["decode"]["greedy_same"] is True
