"""One run per directory: a new run refuses a directory that already holds files, unless asked to overwrite.

A run that shared its directory with an earlier one would mix with it: Hydra rewrites ``.hydra/config.yaml``
before the task starts, and a run that then fails or is interrupted leaves the earlier ``metrics.json`` in place,
which ``compare.py`` would report under the new run's label. So every entry point claims its directory first
(:func:`claim_run_dir`):

* a directory that does not exist or is empty is used as it is;
* a directory with files is refused (:class:`~fwdgrad.errors.RunDirError`, exit status 2), unless the config says
  ``overwrite=true``: then the files an earlier run wrote (:data:`RUN_ENTRIES`, Hydra's ``.hydra/``, logs, a
  sweep's ``multirun.yaml`` and job sub-directories made of these) are deleted first. Anything else in the
  directory is never deleted: its presence refuses the directory even with ``overwrite=true`` (so that
  ``hydra.run.dir=.`` cannot empty a project folder).

Hydra scripts claim the directory in a Hydra callback (:class:`fwdgrad.app.cli.RunDirGuard`), before Hydra writes
``.hydra/``; the Python API (``train(cfg, output_dir)``, ``run_global_optim``, ``run_approx_quality``) claims
its ``output_dir`` too, there with ``hydra_files_are_ours=True`` (inside a Hydra job, ``.hydra/`` and the job's
log are that job's own). Default run directories are unique per process (``configs/hydra/default.yaml``), so
this only ever matters for directories chosen by hand.
"""

from __future__ import annotations

import errno
import logging
import shutil
import time
from pathlib import Path
from typing import List, Optional

from fwdgrad.errors import RunDirError

__all__ = ["RUN_ENTRIES", "STORAGE_ERRNOS", "check_writable", "claim_output_dir", "claim_run_dir", "earlier_run_entries",
           "remove_partial_files", "mark_claimed", "wait_for_claim", "CLAIM_MARKER"]

log = logging.getLogger(__name__)

#: Every file or folder a fwdgrad script writes into its run directory, besides Hydra's: training runs
#: (:mod:`fwdgrad.experiments.training.run_files`), ``global_optim.py`` and ``approx_quality.py``.
RUN_ENTRIES = frozenset({
    "metrics.json", "history.csv", "model.pt", "model.pt.sha256", "plots.png", "tb", "run.json",  # training
    "summary.json", "loss.png", "trajectories.png",  # global_optim.py
    "approx_quality.csv", "cosine_vs_k.png", "norm_ratio_vs_k.png",  # approx_quality.py
})
#: Written by rank 0 of a torchrun job once it has claimed the run directory; the other ranks wait for it.
CLAIM_MARKER = ".fwdgrad-claimed"
_HYDRA_ENTRIES = frozenset({".hydra", "multirun.yaml", CLAIM_MARKER})


def _is_run_entry(path: Path) -> bool:
    """A file or folder an earlier run (or sweep) wrote: a known name, a leftover ``<name>.tmp`` of an atomic
    write, a log, or a sweep's job folder holding nothing else."""
    name = path.name
    if name in RUN_ENTRIES or name in _HYDRA_ENTRIES or name.endswith(".log"):
        return True
    if name.endswith(".tmp") and name[: -len(".tmp")] in RUN_ENTRIES:
        return True
    return path.is_dir() and (path / ".hydra").is_dir() and all(_is_run_entry(p) for p in path.iterdir())


def earlier_run_entries(run_dir: Path, hydra_files_are_ours: bool = False) -> List[str]:
    """The names in ``run_dir`` that were there before this run (all of them, except, with
    ``hydra_files_are_ours``, the ``.hydra/`` folder and ``*.log`` files Hydra wrote for the current job)."""
    if not run_dir.is_dir():
        return []
    names = sorted(p.name for p in run_dir.iterdir())
    if hydra_files_are_ours:
        names = [n for n in names if n not in (".hydra", CLAIM_MARKER) and not n.endswith(".log")]
    return names


def _overlap(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def claim_run_dir(run_dir: Path, overwrite: bool = False, hydra_files_are_ours: bool = False,
                  keep: Optional[Path] = None) -> None:
    """Make sure ``run_dir`` holds no earlier run's files (module docstring); raises :class:`RunDirError`.

    ``keep``: a directory this run reads (``resume=``): a run directory that is it, or holds it, or lies inside
    it, is refused whatever ``overwrite`` says, before anything is deleted (overwriting would delete the run
    being resumed before it is read)."""
    run_dir = Path(run_dir)
    if keep is not None and _overlap(run_dir, Path(keep)):
        raise RunDirError(
            f"the run directory {run_dir} is the run being resumed ({keep}) or overlaps it: writing the resumed "
            "run there would replace the checkpoint it continues from (and overwrite=true would delete it before "
            "it is read). Leave hydra.run.dir out (the resumed run gets a new directory) or choose another one.")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"the run directory {run_dir} is a file; choose a directory (hydra.run.dir=...).")
    names = earlier_run_entries(run_dir, hydra_files_are_ours)
    if not names:
        return
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    if not overwrite:
        raise RunDirError(
            f"the run directory {run_dir} already holds files ({shown}): a new run there would mix with the "
            "earlier one (compare.py would report the earlier results under the new configuration). Leave "
            "hydra.run.dir / hydra.sweep.dir out (every run then gets a new directory), choose an empty one, or add "
            "overwrite=true to delete the earlier run's files first."
        )
    foreign = [n for n in names if not _is_run_entry(run_dir / n)]
    if foreign:
        raise RunDirError(
            f"overwrite=true deletes only the files a run writes, and the run directory {run_dir} also holds "
            f"{', '.join(foreign[:6])}{' and more' if len(foreign) > 6 else ''}, which no fwdgrad run wrote; choose "
            "another directory (hydra.run.dir=...), or move those files away."
        )
    for name in names:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    log.info("overwrite=true: deleted the earlier run's %s from %s", shown, run_dir)


#: errno values of a write that failed for lack of room or rights (not a bug: the run's storage)
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def mark_claimed(run_dir: Path, job: str) -> None:
    """Rank 0 of a multi-process job: say that ``run_dir`` is claimed for the job ``job``."""
    tmp = Path(run_dir) / (CLAIM_MARKER + ".tmp")
    tmp.write_text(job)
    tmp.replace(Path(run_dir) / CLAIM_MARKER)


def wait_for_claim(run_dir: Path, job: str, timeout_s: float = 120.0) -> None:
    """The other ranks: wait until rank 0 has claimed ``run_dir`` for ``job`` (before Hydra writes into it, so
    that rank 0's claim never sees their files); :class:`RunDirError` after ``timeout_s``."""
    marker = Path(run_dir) / CLAIM_MARKER
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if marker.read_text() == job:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RunDirError(f"rank 0 of this torchrun job did not claim the run directory {run_dir} within "
                      f"{timeout_s:.0f} s (it refused the directory or failed: see its message).")


def check_writable(run_dir: Path) -> None:
    """Create ``run_dir`` if needed and write a probe file there, so that a directory the run cannot write
    is refused in one paragraph (:class:`RunDirError`) before anything starts."""
    probe = Path(run_dir) / ".fwdgrad-write-probe"
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RunDirError(
            f"cannot write into the run directory {run_dir} ({err.strerror or err}): it is read-only, not "
            "permitted, or on a full disk. Choose another one (hydra.run.dir=... or hydra.sweep.dir=...), or make "
            "room / grant write access.") from None


def remove_partial_files(run_dir: Path) -> List[str]:
    """Delete the ``<name>.tmp`` files of :data:`RUN_ENTRIES` left by an atomic write that failed (the files they
    were to replace stay as they were); returns their names."""
    removed = []
    for name in sorted(RUN_ENTRIES):
        tmp = Path(run_dir) / (name + ".tmp")
        if tmp.is_file():
            tmp.unlink()
            removed.append(tmp.name)
    return removed


def claim_output_dir(output_dir: Path, overwrite: bool = False, keep: Optional[Path] = None) -> None:
    """:func:`claim_run_dir` for an entry point's ``output_dir``: when it is the current Hydra job's run directory,
    the ``.hydra/`` folder and log there are the job's own (Hydra wrote them, after :class:`fwdgrad.app.cli.RunDirGuard`
    claimed the directory)."""
    from hydra.core.hydra_config import HydraConfig

    output_dir = Path(output_dir)
    ours = HydraConfig.initialized() and Path(HydraConfig.get().runtime.output_dir).resolve() == output_dir.resolve()
    claim_run_dir(output_dir, overwrite=overwrite, hydra_files_are_ours=ours, keep=keep)
