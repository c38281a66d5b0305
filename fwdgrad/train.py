"""The one training loop behind ``mnist_fwdgrad.py`` and ``mnist_backprop.py``.

``train(cfg)`` builds everything from the config by ``hydra.utils.instantiate`` (dataset, model, gradient
estimator, optimizer) and runs the same loop whatever the estimator is:

    for each batch:  zero grads -> compute_gradients (estimator writes p.grad) -> clip -> optimizer.step()
                     -> lr scheduler step

Backprop is just another :class:`~fwdgrad.estimators.GradientEstimator`, so the two scripts differ only in
which estimator their config picks.

Two pieces are kept separate so that a data-parallel version (``torch.distributed``: every rank computes the
gradient of its shard, only rank 0 writes) only has to touch them:

* :func:`compute_gradients`: the whole per-step gradient computation (the place to all-reduce ``.grad``, or
  the directional derivatives of a forward gradient);
* :class:`Recorder`: every file the run writes (TensorBoard, ``history.csv``, ``metrics.json``, ``model.pt``,
  ``plots.png``); construct it with ``enabled=False`` on the other ranks.

The hot loop never synchronises with the device except every ``log_every`` steps: the per-step losses are
summed on the device and read once per logging window, which is also where a non-finite loss and the
``stop_loss_threshold`` are detected.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from fwdgrad.data import Splits, iterate_batches
from fwdgrad.distributed import (
    DataParallelEstimator,
    env_world_size,
    init_from_env,
    launch_workers,
)
from fwdgrad.estimators import GradientEstimator, estimate_module_grads
from fwdgrad.functional import cross_entropy
from fwdgrad.errors import ConfigError, DatasetError
from fwdgrad.memory import RssPeak

__all__ = [
    "ConfigError",
    "HISTORY_COLUMNS",
    "METRIC_KEYS",
    "STOP_REASONS",
    "Recorder",
    "compute_gradients",
    "evaluate",
    "main",
    "resolve_device",
    "train",
]

log = logging.getLogger(__name__)

#: Columns of ``history.csv`` (one row per logged point; empty cells where a value is not available;
#: ``comm/bytes_allreduced`` only in data-parallel runs).
HISTORY_COLUMNS = (
    "step", "epoch", "wall_time_s", "train/loss", "train/accuracy", "test/loss", "test/accuracy", "lr",
    "time/step_ms", "comm/bytes_allreduced",
)
#: TensorBoard scalar tags (the same names as the history columns).
TB_TAGS = ("train/loss", "train/accuracy", "test/loss", "test/accuracy", "lr", "time/step_ms")
#: Keys every ``metrics.json`` has.
METRIC_KEYS = (
    "final_test_accuracy", "best_test_accuracy", "final_test_loss", "final_train_loss", "steps",
    "epochs_completed", "wall_time_s", "step_time_ms", "peak_memory_mb", "peak_memory_source", "stopped",
    "estimator", "dataset", "model", "device",
)
#: Values of ``metrics.json["stopped"]``.
STOP_REASONS = ("completed", "max_steps", "loss_threshold", "non_finite_loss")


# ------------------------------------------------------------------------------------------------------------
# small pieces
# ------------------------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` if available else ``cpu``; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {name!r} ({e}); use device=auto, cpu or cuda.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda was asked for but CUDA is not available; use device=auto or device=cpu.")
    return device


def _build(node: DictConfig, what: str, **kwargs: Any) -> Any:
    """``instantiate(node, **kwargs)``, turning a bad value into one readable :class:`ConfigError`."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause: BaseException = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, DatasetError):
            raise cause from None
        if isinstance(cause, (ValueError, TypeError)):
            raise ConfigError(f"cannot build the {what} from the config: {cause}") from None
        raise


def compute_gradients(
    estimator: GradientEstimator, model: nn.Module, x: Tensor, y: Tensor
) -> Tensor:
    """Estimate the gradient of the mean cross-entropy on ``(x, y)`` and write it into every ``p.grad``.

    The single place where a step's gradient is computed, whatever the estimator (backprop, forward gradient
    with k tangents). Returns the detached batch loss (still on the device: no synchronisation).
    """
    return estimate_module_grads(estimator, model, lambda logits: cross_entropy(logits, y), x)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> tuple[float, float, Tensor]:
    """Mean cross-entropy, accuracy and the predicted classes on ``(x, y)``, by batched no-grad passes."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    preds: List[Tensor] = []
    for xb, yb in iterate_batches(x, y, batch_size):
        logits = model(xb)
        loss_sum += cross_entropy(logits, yb).double() * yb.shape[0]
        preds.append(logits.argmax(dim=1))
    model.train(was_training)
    pred = torch.cat(preds)
    n = y.shape[0]
    return float(loss_sum) / n, float((pred == y).sum()) / n, pred


def _finite_or_none(v: Optional[float]) -> Optional[float]:
    return v if v is not None and math.isfinite(v) else None


def _atomic_write(path: Path, write: Callable[[io.TextIOBase], None]) -> None:
    """Write via a temporary file and ``os.replace``: readers see the old file or the new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        write(f)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------------
# everything the run writes
# ------------------------------------------------------------------------------------------------------------
class Recorder:
    """Every file a run leaves in its directory, written from one object.

    ``enabled=False`` makes every method a no-op (for non-zero ranks of a data-parallel run).
    """

    def __init__(self, output_dir: Path, enabled: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.enabled = enabled
        self.rows: List[Dict[str, Any]] = []
        self._writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(self.output_dir / "tb"))

    def log(self, step: int, epoch: float, wall_time_s: float, values: Mapping[str, float]) -> None:
        """Record one point: TensorBoard scalars and a ``history.csv`` row (written on :meth:`flush`)."""
        if not self.enabled:
            return
        if self.rows and self.rows[-1]["step"] == step:
            row = self.rows[-1]  # e.g. the test metrics at the end of an epoch join that step's train row
        else:
            row = {"step": step}
            self.rows.append(row)
        row["epoch"] = round(epoch, 4)
        row["wall_time_s"] = round(wall_time_s, 3)
        for tag, value in values.items():
            if value is None:
                continue
            row[tag] = value
            self._writer.add_scalar(tag, value, global_step=step)

    def flush(self) -> None:
        """Rewrite ``history.csv`` atomically and flush TensorBoard."""
        if not self.enabled:
            return

        def write(f):
            w = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS, restval="")
            w.writeheader()
            w.writerows(self.rows)

        _atomic_write(self.output_dir / "history.csv", write)
        self._writer.flush()

    def save_checkpoint(self, model: nn.Module, cfg: DictConfig, step: int, epoch: int) -> None:
        """``model.pt``: the model's ``state_dict`` with the resolved config (written atomically)."""
        if not self.enabled:
            return
        tmp = self.output_dir / "model.pt.tmp"
        torch.save(
            {
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "config": OmegaConf.to_container(cfg, resolve=True),
                "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
                "step": step,
                "epoch": epoch,
            },
            tmp,
        )
        os.replace(tmp, self.output_dir / "model.pt")

    def write_metrics(self, metrics: Mapping[str, Any]) -> None:
        if self.enabled:
            _atomic_write(self.output_dir / "metrics.json", lambda f: json.dump(metrics, f, indent=2))

    def plot(self, splits: Optional[Splits], pred: Optional[Tensor], num_misclassified: int) -> None:
        """``plots.png``: loss and accuracy curves, and (image data) a grid of misclassified test images."""
        if not self.enabled or not self.rows:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        def series(tag: str):
            pts = [(r["step"], r[tag]) for r in self.rows if tag in r and r[tag] is not None]
            return [p[0] for p in pts], [p[1] for p in pts]

        wrong = None
        if splits is not None and pred is not None and splits.is_image and num_misclassified > 0:
            wrong = torch.nonzero(pred.cpu() != splits.test_y.cpu()).flatten()[:num_misclassified]
            if wrong.numel() == 0:
                wrong = None
        fig = plt.figure(figsize=(13, 4.2 if wrong is None else 8.4), layout="constrained")
        top, bottom = (fig, None) if wrong is None else fig.subfigures(2, 1, height_ratios=[1, 1.1])
        ax_loss, ax_acc = top.subplots(1, 2)
        for tag, style in (("train/loss", "-"), ("test/loss", "o-")):
            ax_loss.plot(*series(tag), style, label=tag, markersize=3)
        for tag, style in (("train/accuracy", "-"), ("test/accuracy", "o-")):
            ax_acc.plot(*series(tag), style, label=tag, markersize=3)
        ax_loss.set(xlabel="step", ylabel="cross-entropy", title="loss")
        ax_acc.set(xlabel="step", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
        ax_loss.set_yscale("log")
        for ax in (ax_loss, ax_acc):
            ax.grid(alpha=0.3)
            ax.legend()
        if wrong is not None:
            n = wrong.numel()
            cols = min(n, 10)
            rows = math.ceil(n / cols)
            axes = bottom.subplots(rows, cols, squeeze=False)
            bottom.suptitle(f"misclassified held-out examples (first {n}): predicted / true")
            mean = torch.tensor(splits.mean).view(-1, 1, 1)
            std = torch.tensor(splits.std).view(-1, 1, 1)
            names = splits.class_names or tuple(str(i) for i in range(splits.num_classes))
            for ax in axes.flat:
                ax.axis("off")
            for ax, i in zip(axes.flat, wrong.tolist()):
                img = (splits.test_x[i].cpu() * std + mean).clamp(0, 1)  # undo the normalisation
                if img.shape[0] == 1:
                    ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
                else:
                    ax.imshow(img.permute(1, 2, 0).numpy())
                ax.set_title(f"{names[int(pred[i])]} / {names[int(splits.test_y[i])]}", fontsize=8)
        fig.savefig(self.output_dir / "plots.png.tmp.png", dpi=90)
        plt.close(fig)
        os.replace(self.output_dir / "plots.png.tmp.png", self.output_dir / "plots.png")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# ------------------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------------------
def _optional_positive(value: Any, name: str, cast: type = float) -> Any:
    if value is None:
        return None
    v = cast(value)
    if not v > 0:
        raise ConfigError(f"{name} must be positive or null (off), got {value!r}.")
    return v


def train(cfg: DictConfig, output_dir: Optional[str | os.PathLike] = None) -> Dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.dataset`` with the estimator ``cfg.gradient``; return the metrics.

    Args:
        cfg: the composed config (``configs/mnist_fwdgrad.yaml`` or ``configs/mnist_backprop.yaml``).
        output_dir: where to write; defaults to Hydra's run directory (``HydraConfig``), so tests can call
            ``train(cfg, tmp_path)`` without ``@hydra.main``.

    Returns:
        The dict also written to ``metrics.json`` (keys :data:`METRIC_KEYS`). A non-finite loss does not
        raise: it ends the run with ``stopped="non_finite_loss"`` after writing everything (see :func:`main`).
    """
    if output_dir is None:
        from hydra.core.hydra_config import HydraConfig

        output_dir = HydraConfig.get().runtime.output_dir
    output_dir = Path(output_dir)
    opt_cfg = cfg.optimization

    # -- data parallelism: spawn local workers (distributed.world_size > 1) or join torchrun's group -----------
    dist_cfg = cfg.get("distributed") or {}
    requested_world = int(dist_cfg.get("world_size", 1))
    if requested_world < 1:
        raise ConfigError(f"distributed.world_size must be >= 1, got {requested_world}.")
    if not torch.distributed.is_initialized():
        if env_world_size() > 1:  # started by torchrun: every process runs this function
            init_from_env(str(dist_cfg.get("backend", "auto")), float(dist_cfg.get("timeout_s", 120)))
        elif requested_world > 1:
            return _train_data_parallel(cfg, output_dir, requested_world, float(dist_cfg.get("timeout_s", 120)))
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    is_main = rank == 0
    if not is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one log: rank 0's

    # -- validate the scalar settings before any expensive work ------------------------------------------------
    epochs = int(opt_cfg.epochs)
    if epochs < 1:
        raise ConfigError(f"optimization.epochs must be >= 1, got {epochs}.")
    max_steps = _optional_positive(opt_cfg.max_steps, "optimization.max_steps", int)
    clip = _optional_positive(opt_cfg.clip_grad_norm, "optimization.clip_grad_norm")
    threshold = _optional_positive(opt_cfg.stop_loss_threshold, "optimization.stop_loss_threshold")
    gamma = float(opt_cfg.lr_decay)
    if not 0 < gamma <= 1:
        raise ConfigError(f"optimization.lr_decay (per-step gamma) must be in (0, 1], got {gamma}; 1.0 = no decay.")
    log_every = int(cfg.log_every)
    if log_every < 1:
        raise ConfigError(f"log_every must be >= 1, got {log_every}.")
    device = resolve_device(str(cfg.device))
    seed = int(cfg.seed)

    # -- build: data, model (shape from the data), estimator, optimizer ---------------------------------------
    t0 = time.perf_counter()
    splits: Splits = _build(cfg.dataset, "dataset")
    data_load_s = time.perf_counter() - t0
    log.info("data %s (loaded in %.1f s)", splits.describe(), data_load_s)
    torch.manual_seed(seed)  # the initialisation
    model: nn.Module = _build(
        cfg.model, f"model for dataset {splits.name!r}", input_shape=list(splits.input_shape),
        num_classes=splits.num_classes, _convert_="all",
    ).to(device)
    estimator: GradientEstimator = _build(cfg.gradient, "gradient estimator")
    if world > 1:
        # Every rank computes on its shard of each batch; forward gradients all-reduce k scalars, backprop n.
        estimator = DataParallelEstimator(estimator)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _build(opt_cfg.optimizer, "optimizer")(params)
    # The reference's decay lr_t = lr_0 * exp(-k t), stepped every optimizer step: gamma = exp(-k).
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
    splits = splits.to(device)
    n_params = sum(p.numel() for p in params)
    log.info("model %s with %d parameters on %s; estimator %s", type(model).__name__, n_params, device,
             estimator.describe())

    recorder = Recorder(output_dir, enabled=is_main)
    data_gen = torch.Generator().manual_seed(seed)  # the data order
    steps_per_epoch = math.ceil(splits.train_x.shape[0] / splits.batch_size)
    total_steps = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    eval_bs = int(cfg.eval_batch_size)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss = None if device.type == "cuda" else RssPeak().start()  # growth of the resident set from here on

    step = 0
    epochs_completed = 0
    stopped = "completed"
    window_ms: List[float] = []
    test_loss = test_acc = None
    best_acc: Optional[float] = None
    final_train_loss: Optional[float] = None
    pred: Optional[Tensor] = None
    last_eval_step = -1
    t_start = time.perf_counter()

    def run_eval(epoch_f: float) -> None:
        nonlocal test_loss, test_acc, best_acc, pred, last_eval_step
        test_loss, test_acc, pred = evaluate(model, splits.test_x, splits.test_y, eval_bs)
        best_acc = test_acc if best_acc is None else max(best_acc, test_acc)
        last_eval_step = step
        recorder.log(step, epoch_f, time.perf_counter() - t_start,
                     {"test/loss": _finite_or_none(test_loss), "test/accuracy": test_acc})

    run_eval(0.0)  # the curves start at the initialisation
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm(), tqdm(total=total_steps, disable=not (cfg.progress_bar and is_main), unit="step",
                                       dynamic_ncols=True) as bar:
        for epoch in range(epochs):
            model.train()
            win_loss = torch.zeros((), device=device)  # summed on the device: no sync per step
            win_n = 0
            epoch_loss_sum, epoch_n = 0.0, 0
            batch_acc: Optional[Tensor] = None
            t_win = time.perf_counter()
            for i, (x, y) in enumerate(iterate_batches(splits.train_x, splits.train_y, splits.batch_size, data_gen)):
                last_in_epoch = i == steps_per_epoch - 1
                if world > 1:
                    x, y = estimator.shard(x, y)  # same batch order on every rank (same seed): take our rows
                at_log = (step + 1) % log_every == 0 or last_in_epoch or step + 1 == total_steps
                if at_log:
                    # train/accuracy: this batch's accuracy at the parameters the step's loss is taken at (one
                    # extra forward pass per logging window; estimators return the loss, not the logits).
                    with torch.no_grad():
                        batch_acc = (model(x).argmax(dim=1) == y).float().mean()
                optimizer.zero_grad(set_to_none=True)
                loss = compute_gradients(estimator, model, x, y)
                if clip is not None:
                    nn.utils.clip_grad_norm_(params, clip)
                optimizer.step()
                scheduler.step()
                step += 1
                win_loss += loss
                win_n += 1
                bar.update(1)
                if not at_log:
                    continue
                # -- once per logging window: one synchronisation --------------------------------------------
                mean_loss = float(win_loss) / win_n
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                ms = (time.perf_counter() - t_win) * 1000.0 / win_n
                window_ms.append(ms)
                epoch_loss_sum += mean_loss * win_n
                epoch_n += win_n
                lr_now = optimizer.param_groups[0]["lr"]
                recorder.log(step, step / steps_per_epoch, time.perf_counter() - t_start, {
                    "train/loss": mean_loss, "train/accuracy": float(batch_acc), "lr": lr_now, "time/step_ms": ms,
                    **({"comm/bytes_allreduced": estimator.stats.bytes_allreduced} if world > 1 else {}),
                })
                bar.set_postfix(epoch=epoch + 1, loss=f"{mean_loss:.4f}", refresh=False)
                first_step = step - win_n + 1
                win_loss.zero_()
                win_n = 0
                if not math.isfinite(mean_loss):
                    stopped = "non_finite_loss"
                    log.error(
                        "the training loss became %s within steps %d-%d (epoch %d, lr %.3g); stopping. Lower "
                        "optimization.learning_rate or set optimization.clip_grad_norm. The files written so far "
                        "in %s are kept; model.pt, if present, is the checkpoint of the last finished epoch.",
                        mean_loss, first_step, step, epoch + 1, lr_now, output_dir,
                    )
                    break
                if threshold is not None and mean_loss < threshold:
                    stopped = "loss_threshold"
                    log.info("training loss %.4g < stop_loss_threshold %.4g at step %d; stopping.",
                             mean_loss, threshold, step)
                    break
                if step >= total_steps and step < epochs * steps_per_epoch:
                    stopped = "max_steps"
                    break
                t_win = time.perf_counter()
            if epoch_n:
                final_train_loss = epoch_loss_sum / epoch_n
            if stopped == "non_finite_loss":
                break
            if last_in_epoch:  # the epoch's last batch was trained on
                epochs_completed += 1
            run_eval(step / steps_per_epoch)
            log.info(
                "epoch %d/%d  step %d  train loss %.4f  test loss %.4f  test acc %.4f", epoch + 1, epochs, step,
                final_train_loss if final_train_loss is not None else float("nan"), test_loss, test_acc,
            )
            recorder.save_checkpoint(model, cfg, step, epochs_completed)
            recorder.flush()
            if stopped != "completed":
                break

    wall = time.perf_counter() - t_start
    if device.type == "cuda":
        peak_mb: Optional[float] = torch.cuda.max_memory_allocated(device) / 2**20
        peak_src = "cuda_max_memory_allocated"
    else:
        assert rss is not None
        peak_mb = rss.peak_mib()
        peak_src = rss.source
    metrics: Dict[str, Any] = {
        "final_test_accuracy": test_acc,
        "best_test_accuracy": best_acc,
        "final_test_loss": _finite_or_none(test_loss),
        "final_train_loss": _finite_or_none(final_train_loss),
        "steps": step,
        "epochs_completed": epochs_completed,
        "wall_time_s": round(wall, 3),
        "step_time_ms": statistics.median(window_ms) if window_ms else None,
        "peak_memory_mb": round(peak_mb, 1) if peak_mb is not None else None,
        "peak_memory_source": peak_src,
        "stopped": stopped,
        "estimator": estimator.describe(),
        "dataset": splits.name,
        "model": type(model).__name__,
        "device": str(device),
        "model_parameters": n_params,
        "dataset_info": splits.describe(),
        "data_load_s": round(data_load_s, 3),
        "seed": seed,
        "world_size": world,
        # bytes this rank contributed to all-reduces in the last step (k+1 float64 for forward gradients,
        # n+1 floats for backprop); 0 in a single process.
        "allreduce_bytes_per_step": estimator.stats.bytes_allreduced if world > 1 else 0,
    }
    recorder.flush()
    recorder.plot(splits, pred if last_eval_step >= 0 else None, int(cfg.plot_misclassified))
    recorder.write_metrics(metrics)
    recorder.close()
    log.info("done (%s): final test accuracy %.4f, best %.4f, %d steps, %.1f s; outputs in %s", stopped,
             test_acc, best_acc, step, wall, output_dir)
    return metrics


def _data_parallel_worker(rank: int, world_size: int, cfg_yaml: str, output_dir: str) -> None:
    train(OmegaConf.create(cfg_yaml), output_dir)


def _train_data_parallel(cfg: DictConfig, output_dir: Path, world_size: int, timeout_s: float) -> Dict[str, Any]:
    """Run :func:`train` in ``world_size`` local processes (gloo on CPU); return rank 0's metrics."""
    log.info("data-parallel training on %d local processes (each on 1/%d of every batch); rank 0 writes %s",
             world_size, world_size, output_dir)
    launch_workers(_data_parallel_worker, world_size, args=(OmegaConf.to_yaml(cfg, resolve=True), str(output_dir)),
                   timeout_s=timeout_s)
    metrics_file = output_dir / "metrics.json"
    if not metrics_file.is_file():
        raise ConfigError(f"the data-parallel workers finished without writing {metrics_file}; see the log above.")
    return json.loads(metrics_file.read_text())


def main(cfg: DictConfig) -> Dict[str, Any]:
    """What the entry scripts call: :func:`train`, with user errors turned into one short message.

    A dataset, model or config error is logged as one ``ERROR`` line (console and ``<job>.log``) and exits with
    status 1, without a traceback; so does a run stopped by a non-finite loss (after all its files are written),
    except inside a ``-m`` multirun, where the sweep goes on to its next job.
    """
    try:
        metrics = train(cfg)
    except (DatasetError, ConfigError) as e:
        log.error("%s", e)
        raise SystemExit(1) from None
    if metrics["stopped"] == "non_finite_loss":
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.get().mode != RunMode.MULTIRUN:
            raise SystemExit(1)
    return metrics
