"""Smoke test of the benchmark (``make bench``, ``scripts/bench.py``): the quick mode produces the table and the CSV (no timing assertions)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fwdgrad.perf.bench as bench
from fwdgrad.nn.functional import cross_entropy

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_quick_bench_writes_table_and_csv(tmp_path):
    out = tmp_path / "bench"
    # two of the Section 4.5 models (BatchNorm conv net, attention): their rows share one code path, and each model
    # costs seconds of profiler set-up; one thread, as a many-threaded tiny benchmark crawls on a busy machine
    proc = _run("--quick", "--threads", "1", "--models", "mlp,convnet,lenet5,vit,local_mixer_patch", "--out",
                 str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (out / "bench.md").read_text()
    rows = list(csv.DictReader(open(out / "bench.csv")))
    variants = {(r["model"], r["variant"]) for r in rows}
    for model in ("mlp", "convnet"):
        for v in ("forward", "backprop", "fg normal k=1 (torch.func)", "fg normal k=2", "fg rademacher k=1",
                  "fg rank1 k=2", "fg normal k=1 kept", "fg normal k=1 regenerated", "fg counter_normal k=2",
                  # issue 12: FG-A, and on the network with auxiliary heads LG-BP, LG-FG-W, LG-FG-A, guesses
                  "fga normal k=1", "local backprop", "local fg normal k=1", "local fga normal k=1", "local guess"):
            assert (model, v) in variants
    for model in ("lenet5", "vit"):  # the Section 4.5 models: dense normal tangents
        assert {v for m, v in variants if m == model} == {"forward", "backprop", "fg normal k=1 (torch.func)",
                                                          "fg normal k=1", "fg normal k=2"}
    # LocalMixer (issue 24): Table 3's methods with one tangent, with and without its local losses
    assert {v for m, v in variants if m == "local_mixer_patch"} == {
        "forward", "backprop", "fg normal k=1", "fga normal k=1", "local backprop", "local fg normal k=1",
        "local fga normal k=1", "local guess"}
    for r in rows:
        assert float(r["median_ms"]) > 0 and int(r["samples"]) >= 1
        if r["variant"] != "forward":  # every step allocates at least its gradient
            assert float(r["peak_mib"]) > 0
    assert "| model | batch | step | ms / step | R_f (× forward) | fg / bp | peak MiB | RSS MiB |" in md
    assert "default forward gradient (dense normal, k=1):" in md
    assert "| mlp | 8 | fg rank1 k=1 |" in md
    assert "Machine:" in md and "threads" in md and "Deep MLP" in md and "Training loop overhead: MLP" in md
    # the peers, a whole SGD step each (MLP only), and the speed-ups against them
    for k in (1, 2):
        for peer in ("fwdgrad fg normal", "fwdgrad fg counter_normal", "torchzero ForwardGradient", "torch.func.jvp loop"):
            assert ("mlp", f"{peer} k={k}, SGD step") in variants
    assert "fwdgrad (counter_normal) " in md and "x faster than torchzero ForwardGradient (target >= 1.5" in md and "x faster than torch.func.jvp loop" in md
    assert len(list(csv.DictReader(open(out / "quality.csv")))) == 4 * 2  # 4 distributions by default, k = 1, 2
    # zeroth order: MLP rows with their cost, and the deep-MLP check against a no-grad forward pass
    zo = {r["variant"]: r for r in rows if r["model"] == "mlp" and r["variant"].startswith("zo")}
    assert set(zo) == {"zo normal k=1", "zo normal k=2"} and not any(r["variant"].startswith("zo") for r in rows
                                                                    if r["model"] == "convnet")
    assert zo["zo normal k=2"]["passes"] == "5 no-grad forwards" and float(zo["zo normal k=1"]["peak_mib"]) > 0
    assert "| mlp | 8 | zo normal k=1 |" in md and "| passes / step |" in md
    assert "| forward (no grad) |" in md and "| zo normal k=1: passes only |" in md
    assert "zeroth order (dense normal, k=1, central, 3 no-grad passes): the passes peak at" in md


def test_bad_arguments_give_a_one_line_error_and_keep_results(tmp_path):
    proc = _run("--quick", "--models", "resnet", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2
    assert "unknown model 'resnet'; use --models with any of mlp, convnet, lenet5, resnet18, vit" in proc.stderr
    assert "Traceback" not in proc.stderr
    kept = tmp_path / "old"
    kept.mkdir()
    (kept / "bench.md").write_text("earlier results")
    proc = _run("--quick", "--out", str(kept))
    assert proc.returncode == 2 and "is not empty" in proc.stderr
    assert (kept / "bench.md").read_text() == "earlier results"



def test_targets_are_checked_at_every_thread_count():

    def row(threads, variant, ratio, batch=1024):
        return bench.Result("mlp", batch, variant, "normal", 1, "auto", 1.0, 1.0, 1.0, 1.0, 3, 1, 0.0, 0.0,
                            fg_over_bp=ratio, threads=threads)

    lines = bench.targets_report([row(2, "fg normal k=1", 1.10), row(1, "fg normal k=1", 1.20),
                                  row(1, "fg rank1 k=1", 0.5, batch=64)])
    assert lines == [
        "- dense Gaussian k=1, batch 1024: fg/bp <= 1.05, 2 threads: measured 1.10 (NOT met)",
        "- dense Gaussian k=1, batch 1024: fg/bp <= 1.05, 1 thread: measured 1.20 (NOT met)",
        "- structured k=1, batch 64: fg/bp <= 0.75, 1 thread: measured 0.50 (met)",
    ]
    # the default repeats the targets' rows at one thread (skipped when the main run has one thread already)
    args = bench.parse_args([])
    runs = bench.target_runs(args, [1, 4, 16], ["normal", "rademacher", "rank1"], [64, 256, 1024])
    if torch.get_num_threads() == 1:
        assert runs == []
    else:
        assert [(t, b) for t, b, _ in runs] == [(1, 64), (1, 1024)]
        assert [v.label for v in runs[0][2]] == ["forward", "backprop", "fg normal k=1", "fg normal k=16",
                                                 "fg rank1 k=1", "fg rank1 k=16"]
    assert bench.target_runs(bench.parse_args(["--target-threads", ""]), [1], ["normal"], [64]) == []
    proc = _run("--quick", "--threads", "1", "--clock", "thread", "--target-threads", "0,1")
    assert proc.returncode == 2 and "--clock thread needs one thread" in proc.stderr


@pytest.mark.slow
def test_compiled_rows_write_the_eager_gradients():
    """The torch.compile rows (``--compiled-ks``): compiled backprop writes backprop's gradient, the compiled
    torch.func.jvp step writes (grad . v) v for the tangent a generator seeded 0 draws, as eager code would."""
    torch.manual_seed(0)
    model = bench.build_model("mlp", quick=True)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    model.zero_grad(set_to_none=True)
    cross_entropy(model(x), y).backward()
    exact = {n: p.grad.clone() for n, p in model.named_parameters()}
    labels = [v.label for v in bench.compiled_variants([1])]
    assert labels == ["backprop, torch.compile", "fg normal k=1 (torch.func.jvp, torch.compile)",
                      "fg normal k=1, whole step under torch.compile"]
    bench.make_step(bench.Variant("compiled_backprop"), model, x, y)()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, exact[n])
    bench.make_step(bench.Variant("compiled_jvp", "normal", 1), model, x, y)()
    gen = torch.Generator().manual_seed(0)
    tangent = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    d = sum((tangent[n] * exact[n]).sum() for n in exact)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, tangent[n] * d, rtol=1e-4, atol=1e-6)
