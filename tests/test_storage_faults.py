"""A run whose storage fails says so in one paragraph and keeps what it finished.

Run as a user runs it (a subprocess of the real script): a run directory that cannot be written (read-only as
root: a folder under /sys) is refused before anything starts, exit status 2; a run that fills its disk (simulated
with a file-size limit, ``ulimit -f``: every write past it fails with EFBIG as it would with ENOSPC) stops with
one ``[ERROR]`` paragraph and exit status 1, leaves no ``*.tmp`` file, and the checkpoint it had finished before
the fault still resumes.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from fwdgrad.experiments.training.resume import read_checkpoint
from mnist_helpers import ROOT, TINY


def _run(*args: str, cwd: Path, file_limit: int | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:
        if file_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    return subprocess.run([sys.executable, str(ROOT / "mnist_fwdgrad.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, preexec_fn=limit)


def test_a_run_directory_that_cannot_be_written_is_refused_in_one_paragraph(tmp_path: Path):
    target = Path("/sys/fwdgrad-not-writable")
    try:
        target.mkdir()
    except OSError:
        pass
    else:  # this machine lets it be written: nothing to show here
        target.rmdir()
        pytest.skip("/sys is writable here")
    proc = _run(*TINY, f"hydra.run.dir={target}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "[ERROR]" in line]
    assert len(errors) == 1 and "cannot write into the run directory" in errors[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("hidden,limit_kib", [(128, 24), (32, 40)])
def test_a_full_disk_stops_the_run_with_one_paragraph_and_keeps_what_it_finished(tmp_path: Path, hidden: int,
                                                                                 limit_kib: int):
    # 128 hidden units: the first checkpoint (about 40 KiB) cannot be written; 32: every checkpoint (30 KiB) is
    # written and the figure at the end (about 48 KiB) is not
    run_dir = tmp_path / "run"
    proc = _run(*TINY, "optimization.epochs=2", f"model.hidden_sizes=[{hidden}]", f"hydra.run.dir={run_dir}",
                cwd=tmp_path, file_limit=limit_kib * 1024)
    if proc.returncode == 0:
        pytest.skip(f"the run fitted in {limit_kib} KiB per file")
    assert proc.returncode == 1, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out and "a bug" not in out
    errors = [line for line in out.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1 and "disk is full" in errors[0] and "intact" in errors[0]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"  # the files say so too
    assert not list(run_dir.glob("*.tmp"))
    if (run_dir / "model.pt").is_file():  # a checkpoint finished before the fault is whole (its checksum holds)
        assert read_checkpoint(run_dir / "model.pt", "test")["epoch"] >= 1
