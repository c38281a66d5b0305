"""Tabulate the summary.json files of global_optim.py runs: final distance to the minimum per estimator.

    python global_optim.py -m function=beale,rosenbrock seed=0,1,2,3,4
    python scripts/global_optim_table.py outputs/global_optim/<timestamp>_multirun

Prints a Markdown table with one row per (function, estimator): the final distance for every seed, their mean
and worst, and how many runs diverged.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the package lives next to scripts/
    sys.path.insert(0, str(ROOT))

from fwdgrad.app.process import prepare_process  # noqa: E402

prepare_process()

from fwdgrad.app.cli import run_cli  # noqa: E402
from fwdgrad.errors import RunDirError  # noqa: E402


def collect(root: Path) -> Dict[Tuple[str, int, str], Dict[int, dict]]:
    """(function, dim, estimator label) -> {seed: that estimator's summary record}, over root/**/summary.json."""
    rows: Dict[Tuple[str, int, str], Dict[int, dict]] = defaultdict(dict)
    for path in sorted(root.rglob("summary.json")):
        summary = json.loads(path.read_text())
        function, seed = summary["function"], int(summary["config"]["seed"])
        for label, run in summary["estimators"].items():
            rows[(function["name"], function["dim"], label)][seed] = run
    return rows


def markdown(rows: Dict[Tuple[str, int, str], Dict[int, dict]]) -> str:
    lines = ["| function | estimator | seeds | final distance to the minimum, per seed | mean | worst | diverged |",
             "|---|---|---|---|---|---|---|"]
    for (name, dim, label), by_seed in sorted(rows.items()):
        seeds = sorted(by_seed)
        dist: List[float] = [by_seed[s]["distance_to_minimum"] for s in seeds]
        finite = [d for d in dist if d is not None]
        per_seed = ", ".join(f"{d:.1e}" if d is not None else "n/a" for d in dist)
        mean = f"{sum(finite) / len(finite):.1e}" if finite else "n/a"
        worst = f"{max(finite):.1e}" if finite else "n/a"
        diverged = sum(bool(by_seed[s]["diverged"]) for s in seeds)
        title = name if dim == 2 else f"{name} (dim {dim})"
        lines.append(f"| {title} | {label} | {seeds[0]}..{seeds[-1]} | {per_seed} | {mean} | {worst} | {diverged} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="global_optim_table.py", description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="a run or multirun directory holding summary.json files")
    args = parser.parse_args()

    def table() -> int:
        rows = collect(args.root)
        if not rows:
            raise RunDirError(f"no summary.json under {args.root}; run global_optim.py first, or pass the "
                              "directory of a global_optim.py run or sweep (outputs/global_optim/...).")
        sys.stdout.write(markdown(rows) + "\n")
        return 0

    return run_cli(parser.prog, table)


if __name__ == "__main__":
    sys.exit(main())
