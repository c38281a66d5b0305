"""Data-parallel edge cases (issue 15): batches with fewer rows than workers, workers that die or hang, and the
workers' logging.

An empty shard must contribute nothing: before, its loss (a mean over no rows) was nan and nan * 0 = nan, so a
2-worker run on 1,409 digits (the last batch has one row) stopped with a "non-finite loss" at step 23.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from fwdgrad import Backprop, ForwardGradient, estimate_module_grads
from fwdgrad.experiments.training import launch
from fwdgrad.experiments.training.launch import configure_logging, launch_workers, logging_spec
from fwdgrad.parallel import DataParallelEstimator
from fwdgrad.errors import WorkerLostError
from fwdgrad.nn.functional import cross_entropy

#: Batch sizes with one-row batches: with 2 workers, rank 1's shard of those is empty.
BATCHES = (5, 1, 4, 1)
KINDS = {
    "fg": lambda: ForwardGradient(num_tangents=3, seed=3),
    "fg_rank1": lambda: ForwardGradient(num_tangents=2, distribution="rank1", seed=3),
    "bp": Backprop,
}


def _train(kind: str) -> tuple[list[torch.Tensor], list[float]]:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    est = DataParallelEstimator(KINDS[kind]())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for n in BATCHES:
        x, y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
        x, y = est.shard(x, y)
        opt.zero_grad()
        losses.append(float(estimate_module_grads(est, model, lambda out, y=y: cross_entropy(out, y), x)))
        opt.step()
    return [p.detach().clone() for p in model.parameters()], losses


def _worker(rank: int, world_size: int, out_dir: str) -> None:
    torch.save({kind: _train(kind) for kind in KINDS}, Path(out_dir) / f"rank{rank}.pt")


def test_empty_shards_contribute_nothing_and_match_one_process(tmp_path: Path):
    launch_workers(_worker, 2, args=(str(tmp_path),), timeout_s=30)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for kind in KINDS:
        ref_params, ref_losses = _train(kind)  # one process, the whole batches
        assert all(torch.isfinite(torch.tensor(r[kind][1])).all() for r in results), kind
        for rank in (0, 1):
            params, losses = results[rank][kind]
            # float32 rounding only (shard means weighted and summed vs one mean), as in test_distributed.py
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), atol=1e-5, rtol=1e-5)
            for a, ref in zip(params, ref_params):
                torch.testing.assert_close(a, ref, atol=1e-5, rtol=1e-5)
        assert all(torch.equal(a, b) for a, b in zip(results[0][kind][0], results[1][kind][0]))  # ranks agree


def _dropout_worker(rank: int, world_size: int, out_dir: str) -> None:
    # dropout in the loss, shards of uneven size (an empty one too): the ranks draw different amounts of
    # randomness, and must still continue from one random state after every step
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    states = []
    for kind in ("fg", "bp"):
        est = DataParallelEstimator(KINDS[kind]())
        g = torch.Generator().manual_seed(1)
        for n in BATCHES:
            x, y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
            x, y = est.shard(x, y)
            estimate_module_grads(est, model, lambda out, y=y: cross_entropy(out, y), x)
            states.append(torch.get_rng_state())
    torch.save(states, Path(out_dir) / f"states{rank}.pt")


def test_the_replicas_keep_one_random_stream_with_dropout_and_uneven_shards(tmp_path: Path):
    launch_workers(_dropout_worker, 2, args=(str(tmp_path),), timeout_s=30)
    a, b = (torch.load(tmp_path / f"states{r}.pt") for r in (0, 1))
    assert len(a) == 2 * len(BATCHES) and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1])  # the steps did draw (dropout), so the check compares something


# The training runs (a last batch of one row, forward gradient and backprop, two workers equal to one):
# tests/test_distributed.py::test_training_loop_two_workers_equal_one, on 129 = 2 * 64 + 1 digits.


# -- the launcher's supervision ------------------------------------------------------------------------------------
def _killed_worker(rank: int, world_size: int, out_dir: str) -> None:
    est = DataParallelEstimator(Backprop())
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would
    try:
        est._all_reduce(torch.ones(3))
        result = "no error"
    except WorkerLostError as err:
        result = str(err)
    (Path(out_dir) / "rank0.json").write_text(json.dumps(result))


def test_a_killed_worker_is_reported_in_one_paragraph_and_the_others_stop(tmp_path: Path):
    t0 = time.monotonic()
    with pytest.raises(WorkerLostError) as err:
        launch_workers(_killed_worker, 2, args=(str(tmp_path),), timeout_s=5)
    message = str(err.value)
    assert "worker 1" in message and "killed by SIGKILL" in message and "\n" not in message
    assert "Another worker probably died" in json.loads((tmp_path / "rank0.json").read_text())
    assert time.monotonic() - t0 < 60


def _hung_worker(rank: int, world_size: int) -> None:
    if rank == 1:
        time.sleep(600)  # hangs outside any collective: no timeout of torch.distributed applies


def test_a_worker_hung_outside_a_collective_is_stopped(monkeypatch):
    monkeypatch.setattr(launch, "_MARGIN_S", 1.0)
    t0 = time.monotonic()
    with pytest.raises(WorkerLostError, match=r"worker\(s\) 1 still ran"):
        launch_workers(_hung_worker, 2, timeout_s=2)
    assert time.monotonic() - t0 < 60


# -- logging in spawned workers -------------------------------------------------------------------------------------
@pytest.fixture
def clean_root_logger():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers[:] = []
    yield root
    for h in root.handlers:
        h.close()
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def test_workers_get_the_launchers_handlers(tmp_path: Path, clean_root_logger):
    root = clean_root_logger
    log_file = tmp_path / "job.log"
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("[%(levelname)s] %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    spec = logging_spec()
    assert spec[0]["root_level"] == logging.INFO and spec[1]["file"] == str(log_file)
    for rank, level in ((0, logging.INFO), (1, logging.WARNING)):
        root.handlers[:] = []  # as in a freshly spawned process
        configure_logging(spec, rank)
        assert root.level == level
        logging.getLogger("fwdgrad.x").info("epoch 1/3 on rank %d", rank)
        logging.getLogger("fwdgrad.x").warning("trouble on rank %d", rank)
        for h in root.handlers:
            h.close()
    text = log_file.read_text()
    # rank 0 logs as a single process would; other ranks only warnings, marked with their rank
    assert "[INFO] epoch 1/3 on rank 0" in text and "[WARNING] trouble on rank 0" in text
    assert "rank 1" not in text.replace("[WARNING] rank 1: trouble on rank 1", "")
