"""Side-by-side comparison of training runs: one figure, one markdown table, runs labelled by their configs.

A run directory is what the MNIST training scripts (or ``global_optim.py``) write; its files and columns are
defined once, in :mod:`fwdgrad.experiments.training.run_files` (this module reads ``.hydra/config.yaml``, ``metrics.json``,
``run.json`` and ``history.csv``). A global-optimisation run gets its own columns (final and best f(x), the gap
to f*, the distance to the minimum); its curve is that gap, in the history's ``train/loss`` column.
``metrics.json`` is written when a run ends, also when it ends early (``stopped`` says why: interrupted,
non-finite loss, ...); ``run.json`` is written when a training run starts. A directory with ``run.json`` but no
``metrics.json`` holds an *unfinished* run (killed, e.g. by SIGKILL or a machine failure, or still running): it is
listed with ``stopped`` = ``unfinished`` (or ``running``, when its process is alive on this host), the steps its
``history.csv`` reached, and its curves so far. Sweeps (``-m``) hold one run per numbered sub-directory and are
found by searching recursively.

Runs are labelled by what differs among the compared configs: the configs are flattened to dotted keys and
the keys whose values are not all equal make up the labels (``gradient=ForwardGradient k=4 lr=0.001``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import socket
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig, ListConfig, OmegaConf

from fwdgrad.app.cli import run_cli
from fwdgrad.errors import RunDirError
from fwdgrad.experiments.training.run_files import CONFIG_FILE, HISTORY_FILE, METRICS_FILE, RUN_STATUS_FILE

__all__ = [
    "RunDirError",
    "Run",
    "find_run_dirs",
    "load_run",
    "flatten_config",
    "differing_keys",
    "label_runs",
    "default_run_dirs",
    "markdown_table",
    "curve",
    "plot_comparison",
    "compare_runs",
    "main",
]

log = logging.getLogger(__name__)

#: Short names for the keys researchers vary most; other keys are named by their shortest unique suffix.
KEY_ALIASES = {
    "gradient": "gradient",
    "gradient.num_tangents": "k",
    "gradient.aggregation": "agg",
    "gradient.distribution": "tangents",
    "optimization.learning_rate": "lr",
}
_RUN_HELP = (
    "A run directory is what mnist_fwdgrad.py / mnist_backprop.py (or global_optim.py) write when a run ends "
    "(outputs/mnist_fwdgrad/<timestamp>/, or one numbered sub-directory per job of a -m sweep) and holds "
    f"{METRICS_FILE}, {HISTORY_FILE} and {CONFIG_FILE}. Pass such a directory or any parent of several; a run "
    f"that was killed before it could write {METRICS_FILE} is listed as unfinished (it has {RUN_STATUS_FILE})."
)


@dataclass
class Run:
    """One finished training run, as read from its directory."""

    path: Path
    config: dict[str, Any]  #: flattened config, dotted keys (interpolations that copy another key dropped)
    metrics: dict[str, Any]
    history: pd.DataFrame
    label: str = field(default="")


# -- finding and reading runs --------------------------------------------------------------------------------
def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Every run directory in or below ``paths`` (a directory counts when it holds ``metrics.json`` or, for a run
    that never finished, ``run.json``).

    Raises :class:`RunDirError` for a path that does not exist or holds no run. Duplicates (a run given
    directly and through its parent) are listed once, in the order first found; runs found below one parent
    are sorted by path, so a sweep's jobs stay in order (numerically: 2 before 10).
    """
    found: dict[Path, None] = {}
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise RunDirError(f"{p} does not exist. {_RUN_HELP}")
        if p.is_file():
            p = p.parent if p.name in (METRICS_FILE, RUN_STATUS_FILE) else p
            if not p.is_dir():
                raise RunDirError(f"{raw} is a file, not a run directory. {_RUN_HELP}")
        runs = [p] if _is_run_dir(p) else sorted({m.parent for name in (METRICS_FILE, RUN_STATUS_FILE)
                                                  for m in p.rglob(name)})
        if not runs:
            raise RunDirError(f"{p} holds no run: no {METRICS_FILE} or {RUN_STATUS_FILE} was found in it or below "
                              f"it. {_RUN_HELP}")
        for r in sorted(runs, key=_natural_key):
            found.setdefault(r.resolve(), None)
    return list(found)


def _is_run_dir(p: Path) -> bool:
    return (p / METRICS_FILE).is_file() or (p / RUN_STATUS_FILE).is_file()


def _natural_key(p: Path) -> list[list[Any]]:
    # each path part split into text and numbers ("10_lr=0.1" -> ["", 10, "_lr=0.", 1, ""]): job 2 before job 10
    # also when the job's directory name goes on after its number (Hydra's "<num>_<overrides>")
    return [[int(s) if i % 2 else s for i, s in enumerate(re.split(r"(\d+)", part))] for part in p.parts]


def flatten_config(cfg: DictConfig | dict, prefix: str = "") -> dict[str, Any]:
    """Flatten a (possibly unresolved) config to ``{"dotted.key": value}``.

    A value that is an interpolation of another config key (``seed: ${seed}`` under ``gradient``) is dropped:
    it only repeats the key it points to, which is compared in its own right. Interpolations that cannot be
    resolved outside the original run (``${hydra:...}``, ``${now:...}``) are kept as their text. Lists are
    kept as one value.
    """
    if isinstance(cfg, dict):
        cfg = OmegaConf.create(cfg)
    out: dict[str, Any] = {}
    raw = OmegaConf.to_container(cfg, resolve=False)
    for key in cfg.keys():
        dotted = f"{prefix}{key}"
        if OmegaConf.is_missing(cfg, key):
            continue  # `???`: a value known only at run time (e.g. model.input_shape), nothing to compare
        if OmegaConf.is_interpolation(cfg, key):
            node_text = str(raw[key])
            if _refers_to_config_key(node_text):
                continue
            try:
                value = cfg[key]
            except Exception:  # a resolver unavailable here (hydra:, now:, ...): keep the text
                value = node_text
        else:
            value = cfg[key]
        if isinstance(value, DictConfig):
            out.update(flatten_config(value, prefix=f"{dotted}."))
        elif isinstance(value, ListConfig):
            out[dotted] = _to_plain(value)
        else:
            out[dotted] = value
    return out


def _to_plain(value: ListConfig) -> Any:
    try:
        return OmegaConf.to_container(value, resolve=True)
    except Exception:
        return OmegaConf.to_container(value, resolve=False)


def _refers_to_config_key(text: str) -> bool:
    """``${a.b}`` / ``${..x}`` (a plain node reference), as opposed to ``${resolver:...}`` or a string with text."""
    t = text.strip()
    return t.startswith("${") and t.endswith("}") and t.count("${") == 1 and ":" not in t


def load_run(path: str | Path) -> Run:
    """Read one run directory (see the module docstring); :class:`RunDirError` names what is wrong."""
    path = Path(path)
    try:
        metrics = json.loads((path / METRICS_FILE).read_text())
    except FileNotFoundError:
        if not (path / RUN_STATUS_FILE).is_file():
            raise RunDirError(f"{path} holds no {METRICS_FILE}, so it is not a finished run. {_RUN_HELP}") from None
        metrics = _unfinished_metrics(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path / METRICS_FILE} is not valid JSON ({e}); the run may have been interrupted "
                          "while writing it. Re-run it or leave it out of the comparison.") from None
    if not isinstance(metrics, dict):
        raise RunDirError(f"{path / METRICS_FILE} holds a {type(metrics).__name__}, not a JSON object. {_RUN_HELP}")
    cfg_path = path / CONFIG_FILE
    try:
        config = flatten_config(OmegaConf.load(cfg_path))
    except FileNotFoundError:
        found = METRICS_FILE if (path / METRICS_FILE).is_file() else RUN_STATUS_FILE
        raise RunDirError(f"{path} has {found} but no {CONFIG_FILE}, which labels the run; it was not "
                          f"written by a Hydra training script, or the folder was copied without its hidden "
                          f".hydra/ directory. {_RUN_HELP}") from None
    except Exception as e:  # malformed YAML
        raise RunDirError(f"{cfg_path} could not be read as a config ({e}).") from None
    hist_path = path / HISTORY_FILE
    if hist_path.is_file():
        try:
            history = pd.read_csv(hist_path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            log.warning("%s could not be read (%s): the run has no curves", hist_path, e)
            history = pd.DataFrame()
    else:
        log.warning("%s has no %s: the run appears in the table but not in the figure", path, HISTORY_FILE)
        history = pd.DataFrame()
    if metrics.get("stopped") in ("unfinished", "running") and len(history) and "step" in history:
        metrics["steps"] = int(history["step"].max())  # how far it got, as far as its history was written
    return Run(path=path, config=config, metrics=metrics, history=history)


def _unfinished_metrics(path: Path) -> dict[str, Any]:
    """What a run without ``metrics.json`` shows: ``stopped`` = ``running`` if its process is alive on this host,
    else ``unfinished`` (it was killed, or its machine went away), and why, from its ``run.json``."""
    try:
        status = json.loads((path / RUN_STATUS_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        status = {"status": "unknown", "detail": f"{RUN_STATUS_FILE} unreadable: {e}"}
    pid, host = status.get("pid"), status.get("host")
    alive = status.get("status") == "running" and host == socket.gethostname() and _process_alive(pid)
    stopped = "running" if alive else "unfinished"
    if alive:
        detail = f"still running (pid {pid}, started {status.get('started')})"
    elif status.get("status") == "running":
        detail = (f"started {status.get('started')} as pid {pid} on {host} and never ended: killed (SIGKILL, out of "
                  f"memory, a machine failure) or still running elsewhere; no {METRICS_FILE}")
    else:
        detail = f"run.json says {status.get('status')}: {status.get('detail', '')}; no {METRICS_FILE}"
    log.warning("%s: %s", path, detail)
    return {"stopped": stopped, "stop_detail": detail, "estimator": None}


def _process_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def default_run_dirs(roots: Sequence[str | Path] = ("outputs",)) -> list[Path]:
    """The newest run of each estimator (``gradient._target_``) under ``roots``: by default the newest
    forward-gradient run and the newest backprop run. Newest means the latest ``metrics.json``."""
    existing = [Path(r) for r in roots if Path(r).is_dir()]
    metrics_files = [m for r in existing for m in r.rglob(METRICS_FILE)]
    if not metrics_files:
        where = " or ".join(f"{r}/" for r in roots)
        raise RunDirError(
            f"no finished run found under {where} (no {METRICS_FILE}). Train one forward-gradient and one "
            "backprop run first (python mnist_fwdgrad.py; python mnist_backprop.py), or pass run directories: "
            "python compare.py outputs/mnist_fwdgrad/<run> outputs/mnist_fwdgrad/<sweep>_multirun/. " + _RUN_HELP
        )
    newest: dict[str, tuple[float, Path]] = {}
    for m in metrics_files:
        run = m.parent
        try:
            if "final_value" in json.loads(m.read_text()):
                continue  # a global_optim.py run: the default compares training runs
            target = str(flatten_config(OmegaConf.load(run / CONFIG_FILE)).get("gradient._target_", "?"))
        except Exception:
            continue  # unreadable runs are not candidates for the default choice
        mtime = m.stat().st_mtime
        if target not in newest or mtime > newest[target][0]:
            newest[target] = (mtime, run)
    if not newest:
        raise RunDirError(f"runs were found under {', '.join(map(str, existing))} but none has a readable "
                          f"{CONFIG_FILE}. {_RUN_HELP}")
    return [newest[t][1].resolve() for t in sorted(newest)]


# -- labels ----------------------------------------------------------------------------------------------------
def differing_keys(configs: Sequence[dict[str, Any]]) -> list[str]:
    """Keys whose values are not the same in every config (a key absent from some configs differs)."""
    keys = list(dict.fromkeys(k for c in configs for k in c))
    out = []
    for k in keys:
        # JSON text compares lists and scalars by value (1 and 1.0 stay distinct from "1"); None marks absence
        values = {json.dumps(c[k], sort_keys=True, default=repr) if k in c else None for c in configs}
        if len(values) > 1:
            out.append(k)
    return out


def _key_name(key: str, all_keys: Sequence[str]) -> str:
    """Alias, else the shortest dotted suffix that is unique among ``all_keys`` (``._target_`` dropped)."""
    base = key[: -len("._target_")] if key.endswith("._target_") else key
    if base in KEY_ALIASES:
        return KEY_ALIASES[base]
    bases = [k[: -len("._target_")] if k.endswith("._target_") else k for k in all_keys]
    parts = base.split(".")
    for i in range(len(parts) - 1, -1, -1):
        suffix = ".".join(parts[i:])
        if sum(1 for b in bases if b == suffix or b.endswith("." + suffix)) == 1:
            return suffix
    return base


def _fmt_value(key: str, value: Any) -> str:
    if key.endswith("_target_") and isinstance(value, str):
        return value.rsplit(".", 1)[-1]  # fwdgrad.ForwardGradient -> ForwardGradient
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ",".join(_fmt_value("", v) for v in value) + "]"
    return str(value)


def _key_order(key: str) -> int:
    """Aliased keys first, in the order of :data:`KEY_ALIASES`; the sort is stable for the rest."""
    base = key[: -len("._target_")] if key.endswith("._target_") else key
    priority = list(KEY_ALIASES)
    return priority.index(base) if base in priority else len(priority)


def label_runs(runs: Sequence[Run]) -> list[str]:
    """Label each run by the config keys whose values differ among ``runs`` (and set ``run.label``).

    Keys absent from a run are left out of its label. Runs whose configs are identical (repeats) get their
    directory name appended, the only case where a directory name appears.
    """
    keys = differing_keys([r.config for r in runs])
    keys = sorted(keys, key=_key_order)  # stable: otherwise config order
    labels = []
    for r in runs:
        parts = [f"{_key_name(k, keys)}={_fmt_value(k, r.config[k])}" for k in keys if k in r.config]
        labels.append(" ".join(parts))
    if not any(labels):  # one run, or only identical configs: fall back to the estimator
        labels = [_estimator_text(r.metrics) or r.path.name for r in runs]
    counts = pd.Series(labels).value_counts()
    labels = [f"{lab} ({r.path.name})" if counts[lab] > 1 else lab for lab, r in zip(labels, runs)]
    for r, lab in zip(runs, labels):
        r.label = lab
    return labels


# -- the table ------------------------------------------------------------------------------------------------
def _estimator_text(metrics: dict[str, Any]) -> str:
    est = metrics.get("estimator")
    if not isinstance(est, dict):
        return "" if est is None else str(est)
    name = est.get("estimator", "?")
    settings = ", ".join(f"{k}={v}" for k, v in est.items() if k != "estimator")
    return f"{name} ({settings})" if settings else str(name)


def _num(value: Any, fmt: str) -> str:
    if value is None or isinstance(value, bool):
        return "n/a" if value is None else str(value)
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "n/a" if math.isnan(v) else format(v, fmt)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


#: ``(header, metrics.json key, format)`` of the numeric columns, for training runs and for global-optimisation
#: runs (``global_optim.py``, whose metrics hold ``final_value``); a table has the columns of the kinds it shows.
TRAINING_CELLS = (
    ("final test acc", "final_test_accuracy", ".4f"), ("best test acc", "best_test_accuracy", ".4f"),
    ("final train loss", "final_train_loss", ".4f"), ("steps", "steps", ".0f"), ("epochs", "epochs_completed", "g"),
    ("time/step (ms)", "step_time_ms", ".2f"), ("wall time (s)", "wall_time_s", ".1f"),
    ("peak memory (MB)", "peak_memory_mb", ".1f"),
)
OPTIM_CELLS = (
    ("final f(x)", "final_value", ".6g"), ("best f(x)", "best_value", ".6g"), ("final f(x) - f*", "final_gap", ".3e"),
    ("distance to minimum", "distance_to_minimum", ".3e"), ("steps", "steps", ".0f"),
    ("time/step (ms)", "step_time_ms", ".3f"), ("wall time (s)", "wall_time_s", ".1f"),
)
TABLE_COLUMNS = ("run", *(h for h, _, _ in TRAINING_CELLS), "estimator", "stopped", "directory")


def _cells(runs: Sequence[Run]) -> list[tuple[str, str, str]]:
    """The numeric columns for these runs: training columns, then those of optimisation runs not yet there."""
    optim = [("final_value" in r.metrics) for r in runs]
    cells = list(TRAINING_CELLS) if not all(optim) else []
    if any(optim):
        cells += [c for c in OPTIM_CELLS if c[0] not in {h for h, _, _ in cells}]
    return cells


def markdown_table(runs: Sequence[Run], relative_to: Path | None = None) -> str:
    """A markdown table, one row per run (labels from :func:`label_runs`)."""
    cells = _cells(runs)
    rows = []
    for r in runs:
        m = r.metrics
        path = r.path
        if relative_to is not None:
            try:
                path = r.path.relative_to(relative_to.resolve())
            except ValueError:
                pass
        stopped = m.get("stopped")
        rows.append([r.label, *(_num(m.get(key), fmt) for _, key, fmt in cells), _estimator_text(m),
                     "" if stopped in (None, False, "") else str(stopped), str(path)])
    columns = ["run", *(h for h, _, _ in cells), "estimator", "stopped", "directory"]
    stop_col = columns.index("stopped")
    if not any(row[stop_col] for row in rows):  # the column only when some run stopped early
        columns.pop(stop_col)
        rows = [row[:stop_col] + row[stop_col + 1:] for row in rows]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# -- the figure ------------------------------------------------------------------------------------------------
def curve(run: Run, x: str, y: str) -> pd.DataFrame:
    """Columns ``x`` and ``y`` of the run's history where both are logged (empty cells dropped)."""
    from fwdgrad.experiments.plots import history_curve

    return history_curve(run.history, x, y)


def plot_comparison(runs: Sequence[Run], path: Path) -> None:
    """Train loss vs step, train loss vs wall-clock time, test accuracy vs step; one line per run."""
    from fwdgrad.experiments.plots import plot_comparison as plot  # matplotlib only when a figure is drawn

    plot([(r.label, r.history) for r in runs], path)


# -- the whole job -----------------------------------------------------------------------------------------------
def compare_runs(paths: Sequence[str | Path], out_dir: Path) -> dict[str, Any]:
    """Compare the runs in or below ``paths`` (default: :func:`default_run_dirs`) and write
    ``comparison.png`` and ``comparison.md`` into ``out_dir``. Returns the runs, the table and the paths.

    Every run is read and checked before anything is written, so a bad directory leaves no partial output.
    """
    dirs = find_run_dirs(paths) if paths else default_run_dirs()
    runs = [load_run(d) for d in dirs]
    label_runs(runs)
    table = markdown_table(runs, relative_to=Path.cwd())
    differing = differing_keys([r.config for r in runs])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figure = out_dir / "comparison.png"
    plot_comparison(runs, figure)
    md = out_dir / "comparison.md"
    md.write_text(
        f"# Comparison of {len(runs)} run{'s' if len(runs) != 1 else ''}\n\n"
        f"![comparison]({figure.name})\n\n{table}\n\n"
        + (f"Labels show the config keys that differ: {', '.join(f'`{k}`' for k in differing)}.\n"
           if differing else "The runs' configs are identical.\n")
        + _early_stops(runs)
    )
    log.info("wrote %s and %s", figure, md)
    return {"runs": runs, "table": table, "figure": figure, "markdown": md}


def _early_stops(runs: Sequence[Run]) -> str:
    """A note per run that did not complete (interrupted, unfinished, ...), with its reason."""
    notes = [f"- {_cell(r.label)}: **{r.metrics.get('stopped')}**, {r.metrics.get('stop_detail') or ''}"
             for r in runs if r.metrics.get("stopped") not in (None, "", "completed", "max_steps", "loss_threshold")]
    return "\nRuns that did not complete:\n\n" + "\n".join(notes) + "\n" if notes else ""


def _default_out_dir(root: Path = Path("outputs") / "compare") -> Path:
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out, i = root / stamp, 1
    while out.exists():  # never write into an earlier comparison
        out, i = root / f"{stamp}_{i}", i + 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python compare.py [RUN_OR_PARENT_DIR ...] [--out DIR]``: returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="compare.py",
        description="Compare training runs side by side: comparison.png (train loss vs step and vs wall-clock "
                    "time, test accuracy vs step) and comparison.md (final/best accuracy, steps, time per step, "
                    "peak memory, estimator). Runs are labelled by what differs in their configs.",
    )
    parser.add_argument("runs", nargs="*", help="run directories or parents of runs (searched recursively); "
                        "default: the newest forward-gradient and backprop runs under outputs/")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: a new outputs/compare/<timestamp>/)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")

    def compare() -> int:
        result = compare_runs(args.runs, args.out if args.out is not None else _default_out_dir())
        sys.stdout.write(result["table"] + "\n")
        return 0

    return run_cli(parser.prog, compare)
