"""Tabulate LocalMixer runs (``+experiment=local_mixer_<dataset>/<method>``) in the shape of Ren et al.'s Table 3.

    python scripts/local_mixer_table.py RUNS_DIR            # test / train error (%) per method and size, mean +- sd
    python scripts/local_mixer_table.py RUNS_DIR --sweep    # per method and size: the learning rate with the lowest
                                                            # final training loss (no held-out data used)

RUNS_DIR is searched for run directories (``metrics.json`` beside ``.hydra/``); a run's method is the name of its
experiment file, its size ``local_mixer.size``. Prints Markdown; ``--out FILE`` also writes it.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the package lives next to scripts/
    sys.path.insert(0, str(ROOT))

from fwdgrad.app.process import prepare_process  # noqa: E402

prepare_process()

import json  # noqa: E402

from omegaconf import OmegaConf  # noqa: E402

from fwdgrad.estimators import AGGREGATIONS  # noqa: E402

#: Table 3's row order and names (Ren et al. 2023), then the methods this project adds.
METHODS = {"bp": "BP", "l_bp": "L-BP", "lg_bp": "LG-BP", "fg_w": "FG-W", "fg_a": "FG-A", "lg_fg_w": "LG-FG-W",
           "lg_fg_a": "LG-FG-A", "lg_fg_a_k16": "LG-FG-A, k = 16", "lg_fg_a_k32": "LG-FG-A, k = 32",
           "guess": "guesses (Fournier)", "lg_zo": "LG-ZO"}
Run = Dict[str, object]


def read_run(run_dir: Path) -> Optional[Run]:
    """One run's method, size, learning rate, seed and results, or None if it is not a LocalMixer recipe run."""
    overrides = OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")
    experiment = next((o.split("=", 1)[1] for o in overrides if str(o).startswith("+experiment=")), "")
    if not experiment.startswith("local_mixer_"):
        return None
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    train_acc = metrics.get("final_train_accuracy")
    if train_acc is None and (run_dir / "model.pt").is_file():  # a run from before metrics.json recorded it
        train_acc = train_accuracy_of(run_dir)
    # the method as run: a recipe given other tangents or another aggregation on the command line is its own row
    k, aggregation = int(cfg.gradient.get("num_tangents", 1)), str(cfg.gradient.get("aggregation", "mean"))
    method = re.sub(r"_k\d+$", "", experiment.split("/")[1]) + (f"_k{k}" if k != 1 else "")
    method += "" if aggregation == "mean" else f"_{aggregation}"
    return {"dataset": experiment.split("/")[0][len("local_mixer_"):], "method": method,
            "size": str(cfg.local_mixer.size), "lr": float(cfg.optimization.learning_rate), "seed": int(cfg.seed),
            "epochs": int(cfg.optimization.epochs), "test_err": 100 * (1 - metrics["final_test_accuracy"]),
            "train_err": None if train_acc is None else 100 * (1 - train_acc),
            "train_loss": metrics.get("final_train_loss"), "stopped": metrics["stopped"]}


def train_accuracy_of(run_dir: Path) -> float:
    """The final weights' accuracy on the run's whole training set (eval mode), from ``model.pt`` and its config."""
    import torch
    from hydra.utils import instantiate

    from fwdgrad.experiments.training.loop import evaluate

    ckpt = torch.load(run_dir / "model.pt", weights_only=False, map_location="cpu")
    cfg = OmegaConf.create(ckpt["config"])
    splits = instantiate(cfg.dataset)
    model = instantiate(cfg.model, input_shape=list(splits.input_shape), num_classes=splits.num_classes,
                        _convert_="all")
    model.load_state_dict(ckpt["state_dict"])
    return evaluate(model, splits.train_x, splits.train_y, 1000)[1]


def collect(root: Path) -> List[Run]:
    """Every LocalMixer recipe run under ``root`` (following links: a table may link runs from a sweep)."""
    found = [Path(d) for d, _, files in os.walk(root, followlinks=True)
             if "metrics.json" in files and (Path(d) / ".hydra").is_dir()]
    runs = [read_run(d) for d in sorted(found)]
    return [r for r in runs if r is not None]


def _split(method: str) -> Tuple[str, Optional[str]]:
    """``(recipe with its k, aggregation or None)`` of a method key ``<recipe>[_k<k>][_<aggregation>]`` (the
    aggregation is any registered one but the mean, matched longest first: names hold underscores)."""
    for aggregation in sorted(AGGREGATIONS, key=len, reverse=True):
        if aggregation != "mean" and method.endswith(f"_{aggregation}"):
            return method[: -len(aggregation) - 1], aggregation
    return method, None


def method_label(method: str) -> str:
    """A method's row name: Table 3's, or for a variant (``<recipe>[_k<k>][_<aggregation>]``) the recipe's with its
    tangents and aggregation."""
    if method in METHODS:
        return METHODS[method]
    rest, aggregation = _split(method)
    m = re.fullmatch(r"(.*?)(?:_k(\d+))?", rest) if rest not in METHODS else None
    label = METHODS[rest] if m is None else METHODS.get(m[1], m[1]) + (f", k = {m[2]}" if m[2] else "")
    return label + (f", {aggregation}" if aggregation else "")


def method_order(methods: List[str]) -> List[str]:
    """Table 3's order, then the variants of each method right after it, then anything else by name."""
    def base(m: str) -> str:  # the recipe a variant comes from: with its k if that is a recipe, else without
        rest = _split(m)[0]
        return rest if rest in METHODS else re.sub(r"_k\d+$", "", rest)

    rank = {m: i for i, m in enumerate(METHODS)}
    return sorted(methods, key=lambda m: (rank.get(m, rank.get(base(m), len(rank))), m not in METHODS, m))


def _mean_sd(values: List[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def sweep_table(runs: List[Run]) -> str:
    """Per (dataset, method, size): every learning rate's final training loss and test error; the chosen one
    (lowest final training loss) marked."""
    cells: Dict[Tuple[str, str, str], List[Run]] = defaultdict(list)
    for r in runs:
        cells[(r["dataset"], r["method"], r["size"])].append(r)
    lines = ["| dataset | method | size | lr: final train loss (test err %) | chosen lr |", "|---|---|---|---|---|"]
    order = method_order(sorted({m for _, m, _ in cells}))
    for (dataset, method, size), rs in sorted(cells.items(), key=lambda kv: (kv[0][0], order.index(kv[0][1]), kv[0][2])):
        rs = sorted(rs, key=lambda r: r["lr"])
        finite = [r for r in rs if r["train_loss"] is not None and math.isfinite(r["train_loss"])]
        best = min(finite, key=lambda r: r["train_loss"]) if finite else None
        cols = ", ".join(f"{r['lr']:g}: {r['train_loss']:.4f} ({r['test_err']:.2f})" if r in finite else
                         f"{r['lr']:g}: {r['stopped']}" for r in rs)
        lines.append(f"| {dataset} | {method_label(method)} | {size} | {cols} | "
                     f"{best['lr']:g} |" if best else f"| {dataset} | {method} | {size} | {cols} | - |")
    return "\n".join(lines)


def results_table(runs: List[Run]) -> str:
    """Test / train error (%) per method (rows) and size (columns), mean +- sd over seeds, with the seed count."""
    datasets = sorted({r["dataset"] for r in runs})
    out = []
    for dataset in datasets:
        rs = [r for r in runs if r["dataset"] == dataset]
        sizes = sorted({r["size"] for r in rs}, key=lambda s: "SMP".find(s))
        out.append(f"**{dataset}**\n")
        out.append("| method | " + " | ".join(f"{s}: test err % | {s}: train err % | {s}: seeds, epochs"
                                                for s in sizes) + " |")
        out.append("|---|" + "---|---|---|" * len(sizes))
        for method in method_order(sorted({str(r["method"]) for r in rs})):  # every method run, none left out
            row = [method_label(method)]
            for s in sizes:
                cell = [r for r in rs if r["method"] == method and r["size"] == s]
                test = [float(r["test_err"]) for r in cell]
                train = [float(r["train_err"]) for r in cell if r["train_err"] is not None]
                epochs = sorted({int(r["epochs"]) for r in cell})
                row += [_mean_sd(test), _mean_sd(train),
                        f"{len(cell)}, {'/'.join(map(str, epochs))}" if cell else "-"]
            out.append("| " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--sweep", action="store_true", help="the learning-rate sweep's table")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not args.runs.is_dir():
        print(f"error: {args.runs} is not a directory of runs; give the folder holding the runs' directories.",
              file=sys.stderr)
        return 2
    runs = collect(args.runs)
    if not runs:
        print(f"error: no LocalMixer recipe runs (+experiment=local_mixer_*/...) under {args.runs}.", file=sys.stderr)
        return 2
    text = sweep_table(runs) if args.sweep else results_table(runs)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
