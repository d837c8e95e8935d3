"""`gpt2tune data inspect`: what a data source holds, in samples and in tokens."""

from __future__ import annotations

from gpt2tune.data.dataset import tokenize_texts


def percentiles(values: list[int], qs=(0, 10, 50, 90, 95, 99, 100)) -> dict[str, int]:
    if not values:
        return {}
    v = sorted(values)
    return {f"p{q}": v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))] for q in qs}


def inspect_texts(texts: list[str], stats: dict, tokenizer, bos, eos, max_length: int, n_show: int = 3) -> dict:
    ids, truncated = tokenize_texts(tokenizer, texts, bos, eos, 10**9)
    lengths = [len(x) for x in ids]
    return {
        "samples": len(texts),
        "characters": sum(len(t) for t in texts),
        "tokens": sum(lengths),
        "length_tokens": percentiles(lengths),
        "max_length": max_length,
        "truncated_at_max_length": sum(1 for n in lengths if n > max_length),
        "cleaning": stats,
        "examples": texts[:n_show],
    }


def format_report(spec: str, r: dict) -> str:
    lines = [f"source        {spec}",
             f"samples       {r['samples']:,}   characters {r['characters']:,}   tokens {r['tokens']:,}",
             "length (tokens, framing included): " + "  ".join(f"{k}={v}" for k, v in r["length_tokens"].items()),
             f"longer than max_length={r['max_length']}: {r['truncated_at_max_length']:,} samples would be truncated",
             "cleaning      " + ", ".join(f"{k}={v}" for k, v in r["cleaning"].items()),
             *(f"note          {n}" for n in r.get("notes", [])),
             "examples:"]
    for t in r["examples"]:
        one = t.replace("\n", " / ")
        lines.append("  - " + (one[:160] + "…" if len(one) > 160 else one))
    return "\n".join(lines)
