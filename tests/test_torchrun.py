"""A multi-process run under torchrun writes one run directory: docs/distributed.md's own command, run as written
(with the tiny settings of the other script tests), with a run directory given by hand and without one."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mnist_helpers import ROOT, TINY

pytestmark = pytest.mark.slow


def _documented_command() -> list:
    """The torchrun line of docs/distributed.md, as argv after ``torchrun``."""
    text = (ROOT / "docs" / "distributed.md").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("torchrun "))
    return line.split()[1:]


def _torchrun(args: list, cwd: Path) -> subprocess.CompletedProcess:
    args = [str(ROOT / a) if a.endswith(".py") else a for a in args]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", *args, *TINY], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_the_documented_torchrun_command_writes_one_run_directory(tmp_path: Path):
    args = _documented_command()
    assert "--nproc_per_node=2" in args and any(a.startswith("hydra.run.dir=") for a in args)
    proc = _torchrun(args, tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    run_dir = tmp_path / next(a for a in args if a.startswith("hydra.run.dir=")).split("=", 1)[1]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["stopped"] == "completed"
    assert [p for p in (tmp_path / "outputs").rglob(".hydra")] == [run_dir / ".hydra"]


def test_torchrun_without_a_run_directory_writes_one_too(tmp_path: Path):
    args = [a for a in _documented_command() if not a.startswith("hydra.run.dir=")]
    proc = _torchrun(args, tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    runs = [p.parent for p in (tmp_path / "outputs").rglob(".hydra")]
    assert len(runs) == 1 and re.search(r"-torchrun-\d+$", runs[0].name)
    assert (runs[0] / "metrics.json").is_file()
