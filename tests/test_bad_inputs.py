"""Bad values and keys get one clear message, exit status 2, and nothing written (issue 15, item 4 and "bad values").

Each case is tried where a user meets it: the training API (``train``), ``global_optim``'s and ``approx_quality``'s
runners, the estimators' Python API, and (for one case per script) the script itself in a subprocess. "Nothing
written" means no result file: only Hydra's own ``.hydra/`` and log exist in a script's run directory.
"""

from __future__ import annotations

import builtins
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fwdgrad import Backprop, ForwardGradient
from fwdgrad.experiments.quality.analysis import run_approx_quality
from fwdgrad.experiments.data import Splits, mnist
from fwdgrad.parallel import DataParallelEstimator
from fwdgrad.errors import ConfigError, DatasetError
from fwdgrad.estimators import GradientEstimator
from fwdgrad.experiments.global_optim.optimize import run_global_optim
from fwdgrad.app.schema import ApproxQualityConfig, GlobalOptimConfig, TrainingConfig, validate_config
from fwdgrad.experiments.training import train
from mnist_helpers import CONFIGS, ROOT, TINY, compose_cfg
from test_data import _fake_mnist

QUICK = (*TINY, "model=logreg", "optimization.max_steps=2")


def _nothing_written(run_dir: Path) -> bool:
    return not run_dir.exists() or not [p for p in run_dir.iterdir() if p.name != ".hydra" and p.suffix != ".log"]


# -- keys nothing reads, and values of the wrong type ---------------------------------------------------------------
@pytest.mark.parametrize("override,match", [
    ("+optimization.lr=0.1", "`optimization.lr` is not a setting of train().*nothing would read it"),
    ("+sed=3", "Did you mean `seed`"),
    ("optimization.epochs=1.5", "`optimization.epochs`: Value '1.5' of type 'float' could not be converted"),
    ("log_every=ten", "`log_every`: Value 'ten'"),
    ("dataset.limit_train=-5", "dataset.limit_train must be a positive integer"),
    ("dataset.limit_test=0", "dataset.limit_test must be a positive integer"),
    ("+gradient.num_tangent=4", "`gradient.num_tangent` is not one of its arguments.*Did you mean `gradient.num_tangents`"),
    ("+model.dropout=0.1", "`model.dropout` is not one of its arguments"),
    ("+optimization.optimizer.moment=0.9", "Did you mean `optimization.optimizer.momentum`"),
    ("+dataset.shuffle=true", "`dataset.shuffle` is not one of its arguments"),
])
def test_training_refuses_unread_keys_and_bad_types(override: str, match: str, tmp_path: Path):
    with pytest.raises(ConfigError, match=match):
        train(compose_cfg("mnist_fwdgrad", [*QUICK, override]), tmp_path / "run")
    assert _nothing_written(tmp_path / "run")


def test_a_script_refuses_a_key_nothing_reads_in_one_line_with_exit_2(tmp_path: Path):
    # The command, as a user runs it: the exit status and the one [ERROR] line come from the one entry-point
    # path (fwdgrad/app/cli.py), the same for every script and every UserError; the other scripts are tried in process.
    proc = subprocess.run([sys.executable, str(ROOT / "mnist_fwdgrad.py"), "+optimization.lr=0.1",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in output, output[-2000:]
    (line,) = [line for line in output.splitlines() if "[ERROR]" in line]
    assert "`optimization.lr` is not a setting of mnist_fwdgrad.py" in line
    assert _nothing_written(tmp_path / "run")


@pytest.mark.parametrize("run,name,override,expected", [
    (train, "mnist_backprop", "optimization.epochs=1.5", "`optimization.epochs`: Value '1.5'"),
    (run_global_optim, "global_optim", "+optimization.lr=0.1", "`optimization.lr` is not a setting of global_optim.py"),
    (run_approx_quality, "approx_quality", "+num_sample=3", "Did you mean `num_samples`"),
])
def test_every_entry_point_refuses_a_key_nothing_reads(run, name, override, expected, tmp_path: Path):
    with pytest.raises(ConfigError, match=expected):
        run(compose_cfg(name, [override]), tmp_path / "run")
    assert _nothing_written(tmp_path / "run")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize("script,schema,overrides", [
    *[("mnist_fwdgrad", TrainingConfig, [f"{g}={o}"]) for g in ("dataset", "model", "optimization",
                                                                "optimization/scheduler", "gradient")
      for o in _options(g)],
    ("mnist_backprop", TrainingConfig, ["+experiment=reference_mnist"]),
    *[("global_optim", GlobalOptimConfig, [f"function={o}"]) for o in _options("function")],
    *[("global_optim", GlobalOptimConfig, [f"+experiment={o}"]) for o in ("beale", "rosenbrock", "reference_beale")],
    ("global_optim", GlobalOptimConfig, ["baseline=null"]),
    *[("approx_quality", ApproxQualityConfig, [f"source={o}"]) for o in _options("source")],
])
def test_every_shipped_config_fits_its_schema(script, schema, overrides):
    validate_config(compose_cfg(script, overrides), schema, script)


# -- bad values -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,match", [
    ("optimization.learning_rate=-1", "`optimization.learning_rate` must be a finite number > 0, got -1"),
    ("optimization.learning_rate=nan", "must be a finite number > 0, got nan"),
    ("optimization.learning_rate=inf", "must be a finite number > 0, got inf"),
    ("eval_batch_size=0", "eval_batch_size must be an integer >= 1, got 0"),
    (f"seed={2**70}", r"seed must be an integer in \[0, 2\*\*63\)"),
    ("seed=-1", r"seed must be an integer in \[0, 2\*\*63\)"),
])
def test_training_refuses_bad_values_before_writing(override: str, match: str, tmp_path: Path):
    with pytest.raises(ConfigError, match=match):
        train(compose_cfg("mnist_fwdgrad", [*QUICK, override]), tmp_path / "run")
    assert _nothing_written(tmp_path / "run")


@pytest.mark.parametrize("override,match", [
    (f"seed={2**70}", r"seed must be an integer in \[0, 2\*\*63\)"),
    ("optimization.learning_rate=nan", "must be a finite number > 0, got nan"),
    ("optimization.learning_rate=inf", "must be a finite number > 0, got inf"),
])
def test_global_optim_refuses_bad_values_before_writing(override: str, match: str, tmp_path: Path):
    with pytest.raises(ConfigError, match=match):
        run_global_optim(compose_cfg("global_optim", ["iterations=5", override]), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_approx_quality_refuses_a_huge_seed(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
        run_approx_quality(compose_cfg("approx_quality", [f"seed={2**70}", "num_samples=3"]), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("seed", [2**70, -1, 1.5, True])
def test_the_estimator_api_refuses_a_bad_seed(seed):
    with pytest.raises(ConfigError, match="seed must be an integer"):
        ForwardGradient(seed=seed)
    assert ForwardGradient(seed=2**63 - 1).generator(torch.device("cpu")) is not None


def test_projection_with_more_tangents_than_dimensions_is_refused_with_nothing_written(tmp_path: Path):
    # global_optim.py function=rosenbrock gradient.num_tangents=5 gradient.aggregation=projection: a ConfigError
    # (exit status 2 from the script, as every ConfigError: test above)
    cfg = compose_cfg("global_optim", ["function=rosenbrock", "gradient.num_tangents=5",
                                       "gradient.aggregation=projection", "progress=false"])
    with pytest.raises(ConfigError, match="projection needs num_tangents <= n"):
        run_global_optim(cfg, tmp_path / "run")
    assert _nothing_written(tmp_path / "run")  # no tb/ either: each estimator took a first step before any write


# -- data --------------------------------------------------------------------------------------------------------
def _splits(train_y: torch.Tensor, num_classes: int = 3) -> Splits:
    x = torch.zeros(len(train_y), 2)
    return Splits(x, train_y, x[:1], train_y[:1].clamp(0, num_classes - 1), (2,), num_classes, "toy")


@pytest.mark.parametrize("labels,match", [
    ([0, 1, 3], r"1 training label\(s\) outside 0..2 \(e.g. 3\)"),
    ([0, -1, 2], r"outside 0..2 \(e.g. -1\)"),
])
def test_labels_outside_the_classes_are_refused(labels, match):
    with pytest.raises(DatasetError, match=match):
        _splits(torch.tensor(labels))
    _splits(torch.tensor([0, 1, 2]))  # fine


def labels_out_of_range(batch_size: int = 4) -> Splits:
    """A dataset factory (a ``_target_``) whose labels do not fit its ``num_classes``."""
    x = torch.randn(8, 1, 8, 8)
    return Splits(x, torch.arange(8), x, torch.arange(8), (1, 8, 8), 5, "broken", batch_size)


def test_a_dataset_with_labels_outside_its_classes_fails_at_start_up(tmp_path: Path):
    cfg = compose_cfg("mnist_fwdgrad", ["~dataset", f"+dataset._target_={__name__}.labels_out_of_range", "model=logreg",
                                        "progress_bar=false", "optimization.epochs=1", "plot_misclassified=0"])
    with pytest.raises(DatasetError, match="label.*outside 0..4"):
        train(cfg, tmp_path / "run")
    assert _nothing_written(tmp_path / "run")


def test_an_unreadable_data_file_is_named_and_not_called_damaged(tmp_path: Path, monkeypatch):
    # (the tests run as root, which may read anything: the read is made to fail as it would for another user)
    _fake_mnist(tmp_path)
    victim = tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    real_open = builtins.open

    def deny(path, *args, **kwargs):
        if Path(path) == victim:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", deny)
    with pytest.raises(DatasetError) as err:
        mnist(root=str(tmp_path), download=False, test_set_split=10)
    message = str(err.value)
    assert str(victim) in message and "permission problem, not damaged data" in message and "chmod a+r" in message
    assert "delete" not in message


def test_an_unreadable_data_folder_is_named(tmp_path: Path, monkeypatch):
    _fake_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    real_is_file = Path.is_file

    def deny(self):
        if self.parent == raw:
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_file(self)

    monkeypatch.setattr(Path, "is_file", deny)
    with pytest.raises(DatasetError, match=f"{raw} cannot be read: Permission denied"):
        mnist(root=str(tmp_path), download=False, test_set_split=10)


#: Run under setpriv: load each data folder and print the one-paragraph message (one interpreter for both cases).
_LOAD_EACH = """
import sys
from fwdgrad.experiments.data import mnist
from fwdgrad.errors import DatasetError
for root in sys.argv[1:]:
    try:
        mnist(root=root, download=False, test_set_split=10)
        print("[LOADED]", root)
    except DatasetError as err:
        print("[ERROR]", str(err).replace(chr(10), " "))
"""


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is not installed")
def test_unreadable_data_without_root_privileges(tmp_path: Path):
    # The real thing: a process without the capabilities that let root read anything (setpriv drops
    # CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH), on data folders whose file or folder is mode 000.
    victims = []
    for case in ("file", "folder"):
        _fake_mnist(tmp_path / case)
        raw = tmp_path / case / "MNIST" / "raw"
        victims.append(raw / "t10k-labels-idx1-ubyte.gz" if case == "file" else raw)
    try:
        for path in victims:
            path.chmod(0)
        proc = subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search", sys.executable, "-c",
                               _LOAD_EACH, str(tmp_path / "file"), str(tmp_path / "folder")],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        for path in victims:
            path.chmod(0o755)
    output = proc.stdout + proc.stderr
    if "setpriv:" in output:
        pytest.skip(f"setpriv cannot drop capabilities here: {output.strip()[:200]}")
    assert proc.returncode == 0 and "Traceback" not in output, output[-2000:]
    lines = [line for line in output.splitlines() if line.startswith("[ERROR]")]
    assert len(lines) == 2, output[-2000:]
    for path, line in zip(victims, lines):
        assert f"{path} cannot be read" in line and "not damaged" in line and "delete" not in line


# -- the estimators' Python API -----------------------------------------------------------------------------------
ESTIMATORS = {
    "forward": lambda: ForwardGradient(seed=0),
    "forward_k3_projection": lambda: ForwardGradient(num_tangents=3, aggregation="projection", seed=0),
    "forward_rademacher": lambda: ForwardGradient(distribution="rademacher", seed=0),
    "forward_func": lambda: ForwardGradient(backend="func", seed=0),
    "backprop": Backprop,
    "data_parallel": lambda: DataParallelEstimator(ForwardGradient(seed=0)),
}


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_empty_and_integer_params_are_refused(name):
    est = ESTIMATORS[name]()
    with pytest.raises(ConfigError, match="params is an empty dict"):
        est(lambda p: torch.tensor(0.0), {})
    for params in (torch.ones(3, dtype=torch.long), {"w": torch.ones(2), "n": torch.ones(2, dtype=torch.int32)}):
        with pytest.raises(ConfigError, match="dtype torch.int.*floating-point"):  # never an integer estimate
            est(lambda p: torch.tensor(0.0), params)


@pytest.mark.parametrize("name", list(ESTIMATORS))
@pytest.mark.parametrize("write", ["mul_", "setitem", "no_grad_add_"])
def test_a_loss_fn_that_writes_into_the_params_is_refused_and_the_callers_tensor_kept(name, write):
    x = torch.tensor([0.3, -1.2, 2.6])
    before = x.clone()

    def loss_fn(p):
        if write == "mul_":
            p.mul_(2)
        elif write == "setitem":
            p[0] = 0.0
        else:
            with torch.no_grad():
                p.add_(1)
        return (p * torch.tensor([1.0, 2.0, 3.0])).sum()

    with pytest.raises(ConfigError, match="in place") as err:
        ESTIMATORS[name]()(loss_fn, x)
    if name == "backprop" and write == "no_grad_add_":
        # autograd allows a write into a leaf under no_grad, and backprop hands the caller's storage to loss_fn
        # (a copy per step would cost the baseline's timings): the write is reported, not prevented
        assert "the caller's tensors were changed by it" in str(err.value) and not torch.equal(x, before)
    else:
        assert torch.equal(x, before)  # the estimator protected the caller's tensor


class _Careless(GradientEstimator):
    """An estimator that passes the caller's tensors on as they are (as a new estimator might)."""

    def compute(self, loss_fn, params):
        return loss_fn(params).detach(), torch.zeros_like(params)


def test_the_base_class_catches_a_write_into_the_callers_tensors_for_any_estimator():
    x = torch.ones(3)
    with pytest.raises(ConfigError, match="loss_fn modified the parameters it was given in place"):
        _Careless()(lambda p: p.mul_(2).sum(), x)
    assert torch.equal(x, torch.full((3,), 2.0))  # such an estimator cannot prevent it, but it is never silent
    with pytest.raises(ConfigError, match="params is an empty dict"):
        _Careless()(lambda p: p, {})
    loss, g = _Careless()(lambda p: (p * 2).sum(), torch.ones(3))  # a pure loss_fn is fine
    assert float(loss) == 6.0 and np.array_equal(g.numpy(), np.zeros(3))


@pytest.mark.parametrize("distribution", ["normal", "rademacher", "rank1"])
def test_more_tangents_than_memory_holds_are_refused_before_anything_is_allocated(distribution, tmp_path: Path):
    # the API: the first draw checks the k tangents of the largest parameter against the memory available
    params = {"w": torch.randn(64, 32), "b": torch.randn(64)}
    with pytest.raises(ConfigError, match="num_tangents=1000000000 needs at least .* GiB"):
        ForwardGradient(10**9, distribution=distribution, seed=0)(lambda p: (p["w"] ** 2).sum() + p["b"].sum(),
                                                                   params)
    # a training run: refused while its components are built, before the first step (exit 2 in a script)
    cfg = compose_cfg("mnist_fwdgrad", ["dataset=digits", "progress_bar=false", "gradient.num_tangents=1000000000",
                                        f"gradient.distribution={distribution}"])
    with pytest.raises(ConfigError, match="Use fewer tangents"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.json").exists()
