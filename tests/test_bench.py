"""Smoke test of ``scripts/bench.py``: the quick mode produces the table and the CSV (no timing assertions)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_quick_bench_writes_table_and_csv(tmp_path):
    out = tmp_path / "bench"
    proc = _run("--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (out / "bench.md").read_text()
    rows = list(csv.DictReader(open(out / "bench.csv")))
    variants = {(r["model"], r["variant"]) for r in rows}
    for model in ("mlp", "convnet"):
        for v in ("forward", "backprop", "fg normal k=1 (torch.func)", "fg normal k=2", "fg rademacher k=1",
                  "fg rank1 k=2", "fg normal k=1 kept", "fg normal k=1 regenerated",
                  # issue 12: FG-A, and on the network with auxiliary heads LG-BP, LG-FG-W, LG-FG-A, guesses
                  "fga normal k=1", "local backprop", "local fg normal k=1", "local fga normal k=1", "local guess"):
            assert (model, v) in variants
    for r in rows:
        assert float(r["median_ms"]) > 0 and int(r["samples"]) >= 1
        if r["variant"] == "forward":
            assert float(r["r_f"]) == 1.0
        if r["variant"] == "backprop":
            assert float(r["fg_over_bp"]) == 1.0
        if r["variant"] != "forward":  # every step allocates at least its gradient
            assert float(r["peak_mib"]) > 0
    assert "| model | batch | step | ms / step | R_f (× forward) | fg / bp | peak MiB | RSS MiB |" in md
    assert "default forward gradient (dense normal, k=1):" in md
    assert "| mlp | 8 | fg rank1 k=1 |" in md
    assert "Machine:" in md and "threads" in md and "Deep MLP" in md and "Training loop overhead: MLP" in md
    assert len(list(csv.DictReader(open(out / "quality.csv")))) == 3 * 2


def test_bad_arguments_give_a_one_line_error_and_keep_results(tmp_path):
    proc = _run("--quick", "--models", "resnet", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2
    assert "unknown model 'resnet'; use --models with mlp and/or convnet" in proc.stderr
    assert "Traceback" not in proc.stderr
    kept = tmp_path / "old"
    kept.mkdir()
    (kept / "bench.md").write_text("earlier results")
    proc = _run("--quick", "--out", str(kept))
    assert proc.returncode == 2 and "is not empty" in proc.stderr
    assert (kept / "bench.md").read_text() == "earlier results"
