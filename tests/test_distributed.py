"""Data-parallel estimation on torch.distributed (gloo, 2 local processes).

The checks: a 2-process run, each rank on half of every batch, ends with the same parameters as a 1-process
run on the full batches (forward gradient: k + 1 scalars all-reduced, with dense, rank-one and regenerated
tangents alike; backprop: n + 1 floats), and a worker that dies makes the other stop with WorkerLostError
instead of hanging.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from fwdgrad import Backprop, ForwardGradient, ZerothOrder, estimate_module_grads
from fwdgrad.errors import WorkerLostError
from fwdgrad.experiments.training.launch import launch_workers
from fwdgrad.parallel import DataParallelEstimator
from fwdgrad.engine import RankOne, Regenerated
from fwdgrad.estimators import backends
from fwdgrad.nn.functional import cross_entropy
from mnist_helpers import read_history

STEPS, BATCH = 5, 24


def _problem():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    # Batch sizes 24, 24, ..., 23 so the last split is uneven (12 / 11): the weights n_r / N matter.
    xs = [torch.randn(BATCH - (i == STEPS - 1), 6, generator=g) for i in range(STEPS)]
    ys = [torch.randint(0, 3, (x.shape[0],), generator=g) for x in xs]
    return model, xs, ys


def _make_estimator(kind: str):
    return {"fg": lambda: ForwardGradient(num_tangents=4, seed=3),
            "fg_proj": lambda: ForwardGradient(num_tangents=3, aggregation="projection", seed=3),
            # rank-one factors kept; regenerated dense tangents (k > 1, and k = 1 with "auto", whose kept prefix
            # depends on each rank's pass size and so differs between ranks, never the numbers)
            "fg_rank1": lambda: ForwardGradient(num_tangents=4, distribution="rank1", seed=3),
            "fg_regen": lambda: ForwardGradient(num_tangents=3, aggregation="projection", regenerate_tangents=True,
                                                seed=3),
            "fg_k1": lambda: ForwardGradient(seed=3),
            # finite differences: eps = 0.1 keeps float32 rounding / eps (shard vs full batch) below the tolerance
            "zo": lambda: ZerothOrder(num_tangents=3, epsilon=0.1, seed=3),
            "bp": Backprop}[kind]()


K = {"fg": 4, "fg_proj": 3, "fg_rank1": 4, "fg_regen": 3, "fg_k1": 1, "zo": 3, "bp": None}


def _train(kind: str) -> tuple[list[torch.Tensor], list[int], list[float]]:
    """Run STEPS SGD steps through a DataParallelEstimator (world size from the process group, or 1)."""
    model, xs, ys = _problem()
    est = DataParallelEstimator(_make_estimator(kind))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    traffic, losses = [], []
    for x, y in zip(xs, ys):
        x, y = est.shard(x, y)
        opt.zero_grad()
        loss = estimate_module_grads(est, model, lambda out, y=y: cross_entropy(out, y), x)
        opt.step()
        traffic.append(est.stats.bytes_allreduced)
        losses.append(float(loss))
    return [p.detach().clone() for p in model.parameters()], traffic, losses


def _worker(rank: int, world_size: int, kind: str, out_dir: str) -> None:
    params, traffic, losses = _train(kind)
    torch.save({"params": params, "traffic": traffic, "losses": losses}, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.parametrize("kind", list(K))
def test_two_processes_match_one_process(kind, tmp_path):
    ref_params, _, ref_losses = _train(kind)
    launch_workers(_worker, 2, args=(kind, str(tmp_path)), timeout_s=30)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for a, b, ref in zip(r0["params"], r1["params"], ref_params):
        assert torch.equal(a, b)  # ranks rebuild the identical update
        torch.testing.assert_close(a, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(r0["losses"]), torch.tensor(ref_losses), atol=1e-5, rtol=1e-5)
    n = sum(p.numel() for p in ref_params)
    k = K[kind]
    # Forward gradient: k directional derivatives + the loss, float64. Backprop: n gradient entries + loss, float32.
    expected = (k + 1) * 8 if k else (n + 1) * 4
    assert r0["traffic"] == [expected] * STEPS


@pytest.mark.parametrize("kind,tangent", [("fg_rank1", RankOne), ("fg_regen", Regenerated)])
def test_data_parallel_path_keeps_rank_one_factors_and_regenerated_tangents(kind, tangent, monkeypatch):
    # What reaches the engine through the wrapper is what the estimator itself would pass: factors or
    # regenerated tangents, never materialised dense ones.
    seen = []
    real = backends.forward_tangents

    def spy(fn, p, t, k, stats=None):
        seen.append(type(t["0.weight"]))
        return real(fn, p, t, k, stats)

    monkeypatch.setattr(backends, "forward_tangents", spy)
    _, traffic, _ = _train(kind)
    assert seen and set(seen) == {tangent}
    assert traffic == [(K[kind] + 1) * 8] * STEPS  # k + 1 float64 scalars per step


def _dying_worker(rank: int, world_size: int, out_dir: str, mode: str) -> None:
    model, xs, ys = _problem()
    est = DataParallelEstimator(ForwardGradient(seed=0))
    if rank == 1:
        if mode == "exit":
            os._exit(0)  # vanish without a word (exit code 0 so the launcher does not kill rank 0 itself)
        time.sleep(8)  # "hang": never join the collective
        return
    t0 = time.monotonic()
    try:
        x, y = est.shard(xs[0], ys[0])
        estimate_module_grads(est, model, lambda out: cross_entropy(out, y), x)
        result = {"error": None}
    except WorkerLostError as exc:
        result = {"error": str(exc)}
    result["seconds"] = time.monotonic() - t0
    (Path(out_dir) / "rank0.json").write_text(json.dumps(result))


@pytest.mark.parametrize("mode", ["exit", "hang"])
def test_lost_worker_stops_the_others_with_a_clear_error(mode, tmp_path):
    launch_workers(_dying_worker, 2, args=(str(tmp_path), mode), timeout_s=3)
    result = json.loads((tmp_path / "rank0.json").read_text())
    assert result["error"] is not None and "Another worker probably died" in result["error"]
    assert result["seconds"] < 30


# -- the training loop: distributed.world_size=2 through the real configs ------------------------------------------
def _compose(name: str, *overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "configs"), version_base="1.3"):
        # 129 = 2 * 64 + 1 training rows: every third batch has one row, so rank 1's shard of it is empty (issue 15)
        return compose(name, overrides=["dataset=digits", "model=mlp", "model.hidden_sizes=[32]", "progress_bar=false",
                                        "dataset.limit_train=129", "dataset.limit_test=100",
                                        "optimization.max_steps=12", "log_every=4", *overrides])


@pytest.mark.slow
@pytest.mark.parametrize("name,extra,k", [("mnist_fwdgrad", ["gradient.num_tangents=4"], 4), ("mnist_backprop", [], None)])
def test_training_loop_two_workers_equal_one(name, extra, k, tmp_path):
    from fwdgrad.experiments.training import train

    m1 = train(_compose(name, "distributed.world_size=1", *extra), tmp_path / "one")
    m2 = train(_compose(name, "distributed.world_size=2", *extra), tmp_path / "two")
    s1 = torch.load(tmp_path / "one" / "model.pt")["state_dict"]
    s2 = torch.load(tmp_path / "two" / "model.pt")["state_dict"]
    for key in s1:
        torch.testing.assert_close(s2[key], s1[key], atol=1e-6, rtol=1e-5)
    assert m2["world_size"] == 2 and m2["steps"] == m1["steps"] == 12
    n = sum(t.numel() for t in s1.values())
    assert m2["allreduce_bytes_per_step"] == ((k + 1) * 8 if k else (n + 1) * 4)
    assert m1["allreduce_bytes_per_step"] == 0
    # Only rank 0 wrote: one history with the traffic column filled in.
    history = (tmp_path / "two" / "history.csv").read_text().splitlines()
    assert "comm/bytes_allreduced" in history[0]
    assert str(m2["allreduce_bytes_per_step"]) in history[1] + history[2]
    # the history equals one process's: train loss and the window's batch accuracy are over the whole batch
    rows = [read_history(tmp_path / d)[1] for d in ("one", "two")]
    for column in ("step", "train/loss", "train/accuracy", "test/loss", "test/accuracy"):
        a, b = ([float(r[column]) for r in rs if r[column]] for rs in rows)
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7), column
