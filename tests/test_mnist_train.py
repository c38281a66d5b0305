"""The one training loop (fwdgrad.experiments.training.train) on offline data: every model with every estimator, the files a
run leaves behind, stopping rules, seeding, clipping and start-up errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from fwdgrad.errors import ConfigError
from fwdgrad.experiments.training import HISTORY_COLUMNS, METRIC_KEYS, STOP_REASONS, TB_TAGS, train
from mnist_helpers import TINY, compose_cfg, read_history, read_metrics


@pytest.mark.parametrize("script", ["mnist_fwdgrad", "mnist_backprop"])
@pytest.mark.parametrize("model", ["logreg", "mlp", "conv", "local_mixer"])
def test_one_short_epoch_of_every_model_with_every_estimator(script: str, model: str, tmp_path: Path):
    # 96 training examples in batches of 32: one epoch is three steps of the real default models.
    cfg = compose_cfg(script, [*TINY, f"model={model}", "dataset.limit_train=96", "dataset.limit_test=64",
                               "dataset.batch_size=32", "optimization.learning_rate=1e-3", "log_every=2"])
    torch.manual_seed(cfg.seed)
    init = instantiate(cfg.model, input_shape=[1, 8, 8], num_classes=10, _convert_="all").state_dict()
    m = train(cfg, tmp_path)
    assert m["stopped"] == "completed" and m["steps"] == 3 and m["epochs_completed"] == 1
    assert math.isfinite(m["final_train_loss"]) and 0.0 <= m["final_test_accuracy"] <= 1.0
    assert m["estimator"]["estimator"] == ("ForwardGradient" if script == "mnist_fwdgrad" else "Backprop")
    final = torch.load(tmp_path / "model.pt", weights_only=False)["state_dict"]
    assert final.keys() == init.keys()
    assert any(not torch.equal(final[k], init[k]) for k in init)  # the optimizer moved the parameters


def test_a_run_writes_the_contract_files(tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = compose_cfg("mnist_fwdgrad", [*TINY, "model=logreg", "optimization.epochs=2", "log_every=5",
                                        "plot_misclassified=12", "optimization.learning_rate=5e-2",
                                        "optimization.scheduler.gamma=0.99", "gradient.num_tangents=8"])
    m = train(cfg, tmp_path)
    steps_per_epoch = math.ceil(1438 / 64)

    # metrics.json: every contract key, consistent with the run.
    disk = read_metrics(tmp_path)
    assert set(METRIC_KEYS) <= disk.keys() and disk == m
    assert disk["stopped"] in STOP_REASONS and disk["stopped"] == "completed"
    assert disk["steps"] == 2 * steps_per_epoch and disk["epochs_completed"] == 2
    assert disk["estimator"] == instantiate(cfg.gradient).describe()
    assert disk["dataset"] == "digits" and disk["model"] == "LogisticRegression" and disk["device"] == "cpu"
    assert disk["best_test_accuracy"] >= disk["final_test_accuracy"] > 0.5  # it learned (chance: 0.1)
    assert disk["step_time_ms"] > 0 and disk["wall_time_s"] > 0
    assert disk["peak_memory_source"] in ("rss_hwm_delta", "ru_maxrss_delta")
    if disk["peak_memory_source"] == "rss_hwm_delta":  # reset after data loading: the loop's own growth
        assert disk["peak_memory_mb"] > 0

    # history.csv: the contract columns; the test set at step 0 and after every epoch; lr follows the decay.
    columns, rows = read_history(tmp_path)
    assert tuple(columns) == HISTORY_COLUMNS
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == 2 * steps_per_epoch
    tested = [int(r["step"]) for r in rows if r["test/accuracy"]]
    assert tested == [0, steps_per_epoch, 2 * steps_per_epoch]
    assert float(rows[-1]["test/accuracy"]) == pytest.approx(m["final_test_accuracy"])
    for r in rows[1:]:
        assert float(r["lr"]) == pytest.approx(5e-2 * 0.99 ** int(r["step"]), rel=1e-6)
        assert float(r["time/step_ms"]) > 0 and 0 <= float(r["train/accuracy"]) <= 1
        assert math.isfinite(float(r["train/loss"]))
    assert rows[0]["train/loss"] == "" and rows[0]["lr"] == ""  # empty cells where nothing was measured

    # TensorBoard: the contract tags, one scalar per logged point.
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert set(TB_TAGS) <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("test/accuracy")] == tested

    # model.pt: the final weights and the resolved config; they rebuild the model and reproduce its accuracy.
    ckpt = torch.load(tmp_path / "model.pt", weights_only=False)
    assert ckpt["config"]["gradient"]["_target_"] == "fwdgrad.ForwardGradient" and ckpt["step"] == steps[-1]
    model = instantiate(cfg.model, input_shape=[1, 8, 8], num_classes=10, _convert_="all")
    model.load_state_dict(ckpt["state_dict"])
    splits = instantiate(cfg.dataset)
    accuracy = float((model(splits.test_x).argmax(1) == splits.test_y).float().mean())
    assert accuracy == pytest.approx(m["final_test_accuracy"])
    train_accuracy = float((model(splits.train_x).argmax(1) == splits.train_y).float().mean())
    assert train_accuracy == pytest.approx(m["final_train_accuracy"])  # the whole training set, at the end

    # plots.png: a real PNG, taller than the curves alone because of the misclassified-image grid.
    import matplotlib.image

    assert (tmp_path / "plots.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    h, w = matplotlib.image.imread(tmp_path / "plots.png").shape[:2]
    assert h > 500 and w > 1000
    assert not list(tmp_path.glob("*.tmp*"))  # the atomic writes left no temporary files


def test_tabular_run_plots_curves_only(tmp_path: Path):
    cfg = compose_cfg("mnist_backprop", [*TINY, "dataset=penguins", "model=mlp", "model.hidden_sizes=[16]",
                                         "plot_misclassified=12", "optimization.learning_rate=0.1"])
    m = train(cfg, tmp_path)
    assert m["dataset"] == "penguins" and m["stopped"] == "completed"
    import matplotlib.image

    h, _ = matplotlib.image.imread(tmp_path / "plots.png").shape[:2]
    assert h < 500  # no image grid for tabular data


def test_stop_when_the_training_loss_falls_below_the_threshold(tmp_path: Path):
    cfg = compose_cfg("mnist_backprop", [*TINY, "model=logreg", "optimization.epochs=20", "log_every=1",
                                         "optimization.learning_rate=0.1", "optimization.stop_loss_threshold=0.5"])
    m = train(cfg, tmp_path)
    assert m["stopped"] == "loss_threshold"
    assert 1 < m["steps"] < 20 * math.ceil(1438 / 64)
    _, rows = read_history(tmp_path)
    losses = [float(r["train/loss"]) for r in rows if r["train/loss"]]
    assert losses[-1] < 0.5 and all(v >= 0.5 for v in losses[:-1])  # it stopped at the first crossing
    assert int(rows[-1]["step"]) == m["steps"] and rows[-1]["test/accuracy"]  # and evaluated there


def test_max_steps(tmp_path: Path):
    cfg = compose_cfg("mnist_fwdgrad", [*TINY, "model=logreg", "optimization.epochs=5",
                                        "optimization.max_steps=30", "log_every=7"])
    m = train(cfg, tmp_path)
    assert m["stopped"] == "max_steps" and m["steps"] == 30 and m["epochs_completed"] == 1


def test_non_finite_loss_stops_and_keeps_valid_files(tmp_path: Path):
    # SGD at lr 1e5 on a ReLU MLP: the weights grow geometrically and overflow to inf/nan during epoch 3.
    cfg = compose_cfg("mnist_backprop", [*TINY, "model=mlp", "model.hidden_sizes=[32]", "optimization.epochs=6",
                                         "log_every=1", "optimization.learning_rate=1e5",
                                         "optimization/scheduler=constant"])
    m = train(cfg, tmp_path)
    steps_per_epoch = math.ceil(1438 / 64)
    assert m["stopped"] == "non_finite_loss"
    assert m["epochs_completed"] == 2 and 2 * steps_per_epoch < m["steps"] <= 3 * steps_per_epoch
    assert read_metrics(tmp_path) == m  # valid JSON (no NaN literals)
    assert m["final_test_accuracy"] is not None  # from the last finished epoch
    _, rows = read_history(tmp_path)
    assert math.isnan(float(rows[-1]["train/loss"])) or math.isinf(float(rows[-1]["train/loss"]))
    ckpt = torch.load(tmp_path / "model.pt", weights_only=False)
    assert ckpt["step"] == 2 * steps_per_epoch  # the last finished epoch, not the diverged weights
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())


def test_the_seed_reproduces_a_run(tmp_path: Path):
    def run(seed: int, name: str):
        cfg = compose_cfg("mnist_fwdgrad", [*TINY, "model=mlp", "model.hidden_sizes=[32]", f"seed={seed}",
                                            "optimization.max_steps=12", "log_every=1"])
        train(cfg, tmp_path / name)
        _, rows = read_history(tmp_path / name)
        return [r["train/loss"] for r in rows], torch.load(tmp_path / name / "model.pt")["state_dict"]

    loss_a, state_a = run(0, "a")
    loss_b, state_b = run(0, "b")
    loss_c, state_c = run(1, "c")
    assert loss_a == loss_b and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert loss_a != loss_c and not torch.equal(state_a["net.0.weight"], state_c["net.0.weight"])


@pytest.mark.parametrize("clip", [1e-3, None])
def test_gradient_clipping_bounds_the_step(clip, tmp_path: Path):
    cfg = compose_cfg("mnist_backprop", [*TINY, "model=logreg", "optimization.max_steps=1",
                                         "optimization.learning_rate=1.0", "optimization/scheduler=constant",
                                         f"optimization.clip_grad_norm={'null' if clip is None else clip}"])
    torch.manual_seed(cfg.seed)
    init = instantiate(cfg.model, input_shape=[1, 8, 8], num_classes=10, _convert_="all").state_dict()
    train(cfg, tmp_path)
    final = torch.load(tmp_path / "model.pt")["state_dict"]
    # Plain SGD moves the parameters by lr * g, and clipping caps |g| at clip_grad_norm.
    moved = math.sqrt(sum(float((final[k] - init[k]).pow(2).sum()) for k in init))
    if clip is None:
        assert moved > 0.1
    else:
        assert 0.5 * clip < moved <= clip * (1 + 1e-5)


def test_conv_on_tabular_data_fails_at_start_up(tmp_path: Path):
    cfg = compose_cfg("mnist_fwdgrad", [*TINY, "dataset=penguins", "model=conv"])
    with pytest.raises(ConfigError, match="model=mlp or model=logreg"):
        train(cfg, tmp_path)
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "tb").exists()


@pytest.mark.parametrize("override,match", [
    ("optimization.scheduler._target_=torch.optim.lr_scheduler.StepLR", "optimization.scheduler"),
    ("optimization.optimizer.momentum=-1", "optimization.optimizer"),
    ("optimization.epochs=0", "epochs"),
    ("gradient.aggregation=median", "aggregation"),
    ("model.activation=swish", "activation"),
])
def test_bad_settings_fail_at_start_up(override: str, match: str, tmp_path: Path):
    cfg = compose_cfg("mnist_fwdgrad", [*TINY, override])
    with pytest.raises(ConfigError, match=match):
        train(cfg, tmp_path)


def test_a_config_error_in_a_data_parallel_worker_stays_a_config_error(tmp_path: Path):
    # The conv net refuses tabular data inside each spawned worker; the parent re-raises it as what it was, so
    # the entry point still exits with status 2 (not the 1 of a failure during the run).
    cfg = compose_cfg("mnist_fwdgrad", [*TINY, "dataset=penguins", "model=conv", "distributed.world_size=2",
                                        "distributed.timeout_s=30"])
    with pytest.raises(ConfigError, match="model=mlp or model=logreg"):
        train(cfg, tmp_path)
    assert not (tmp_path / "metrics.json").exists()
