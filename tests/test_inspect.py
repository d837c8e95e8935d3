import json

from conftest import ZH_TEXT


def test_data_inspect_reports_counts_percentiles_and_truncation(tmp_path, run_cli):
    f = tmp_path / "d.txt"
    f.write_text("\n".join(ZH_TEXT + ["長" * 300]), encoding="utf-8")
    code, out, err = run_cli("data", "inspect", f"text:{f}", "--max-length", "40", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["samples"] == 5
    # char vocabulary: one token per character, plus [CLS] and [SEP]
    assert r["length_tokens"]["p0"] == len(ZH_TEXT[0]) + 2 and r["length_tokens"]["p100"] == 302
    assert r["truncated_at_max_length"] == 1
    code, out, _ = run_cli("data", "inspect", f"text:{f}", "--max-length", "40")
    assert "samples       5" in out and "1 samples would be truncated" in out


def test_data_inspect_bad_source_is_one_line_error(tmp_path, run_cli):
    code, _, err = run_cli("data", "inspect", f"jsonl:{tmp_path / 'missing.jsonl'}")
    assert code == 2 and err.strip().startswith("gpt2tune: error: data file not found")


def test_data_inspect_shows_the_readers_decisions(tmp_path, run_cli):
    f = tmp_path / "d.txt"
    f.write_text("\n".join(ZH_TEXT[:2]) + "\n\n" + "\n".join(ZH_TEXT[2:]) + "\n", encoding="utf-8")
    code, out, err = run_cli("data", "inspect", f"text:{f}", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["cleaning"]["text_mode"] == "lines" and r["samples"] == len(ZH_TEXT)
    assert len(r["notes"]) == 1 and "text_mode auto -> lines" in r["notes"][0]
    code, out, _ = run_cli("data", "inspect", f"text:{f}")
    assert "note          " + r["notes"][0] in out
