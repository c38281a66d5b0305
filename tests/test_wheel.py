"""The core installs and trains with torch alone: a wheel built by ``pip wheel``, installed into a fresh virtualenv
that holds only the pinned torch (and torch's own dependencies), trains a small model through the public API, and
an entry point run there without the ``experiments`` extra names the extra and exits with status 2.

The fresh environment gets torch without a second multi-gigabyte install: a ``.pth`` file adds a folder of links
to exactly the distributions of torch's dependency closure (read from their metadata) in this test's own
environment. Nothing else of this environment (Hydra, matplotlib, numpy, ...) is visible there, which the test
checks.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.markers import Marker

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def torch_closure() -> dict[str, md.Distribution]:
    """torch and every distribution it requires, recursively (markers evaluated, extras skipped)."""
    found: dict[str, md.Distribution] = {}
    todo = ["torch"]
    while todo:
        name = todo.pop()
        if _key(name) in found:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        found[_key(name)] = dist
        for req in dist.requires or []:
            spec, _, marker = req.partition(";")
            if marker and ("extra" in marker or not Marker(marker).evaluate()):
                continue
            todo.append(re.match(r"[A-Za-z0-9_.\-]+", spec.strip()).group(0))
    return found


def _link_closure(target: Path) -> None:
    site = Path(sysconfig.get_paths()["purelib"])
    target.mkdir()
    for dist in torch_closure().values():
        for top in {Path(str(f)).parts[0] for f in dist.files or []}:
            src = site / top
            if src.exists() and not (target / top).exists() and top != "..":
                (target / top).symlink_to(src)


def _run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # pip in the fresh environment sees no index, no folder of wheels and no machine-wide constraint: what it
    # needs must already be there (torch's closure, through the .pth file)
    env.update(PIP_CONSTRAINT="", PIP_FIND_LINKS="", PIP_EXTRA_INDEX_URL="", PIP_NO_INDEX="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, **kwargs)


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory) -> Path:
    """A new virtualenv with the fwdgrad wheel installed over torch alone; returns its python."""
    tmp = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp / "dist"), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp / "dist").glob("fwdgrad-*.whl"))
    venv = tmp / "venv"
    made = _run([sys.executable, "-m", "venv", str(venv)])
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # the virtualenv's own setuptools (older than torch requires) would hide the linked one
    removed = _run([str(python), "-m", "pip", "uninstall", "-y", "-q", "setuptools"])
    assert removed.returncode == 0, removed.stderr
    _link_closure(tmp / "torch_only")
    (site / "torch_only.pth").write_text(str(tmp / "torch_only") + "\n")
    installed = _run([str(python), "-m", "pip", "install", "-q", str(wheel)])
    assert installed.returncode == 0, installed.stderr[-2000:]
    return python


_TRAIN = """
import importlib.util, sys
import torch
from fwdgrad import ForwardGradient, estimate_module_grads
from fwdgrad.nn.functional import cross_entropy
assert "site-packages" in sys.modules["fwdgrad"].__file__, sys.modules["fwdgrad"].__file__
absent = [m for m in ("hydra", "omegaconf", "matplotlib", "pandas", "tensorboard", "sklearn", "numpy")
          if importlib.util.find_spec(m) is not None]
assert absent == [], absent
torch.manual_seed(0)
w_true = torch.randn(8, 3)
x = torch.randn(256, 8)
y = (x @ w_true).argmax(1)
model = torch.nn.Linear(8, 3)
est, opt = ForwardGradient(num_tangents=4, seed=0), torch.optim.SGD(model.parameters(), lr=0.1)
losses = []
for step in range(200):
    opt.zero_grad()
    losses.append(float(estimate_module_grads(est, model, lambda out: cross_entropy(out, y), x)))
    opt.step()
print(losses[0], sum(losses[-10:]) / 10)
"""


def test_the_wheel_trains_a_model_with_torch_alone(fresh_env, tmp_path):
    out = _run([str(fresh_env), "-c", _TRAIN], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    first, last = map(float, out.stdout.split())
    assert last < 0.5 * first  # it learns: a forward gradient with 4 tangents on 27 parameters


def test_an_entry_point_without_the_extra_names_it_and_exits_2(fresh_env, tmp_path):
    shutil.copy(ROOT / "mnist_fwdgrad.py", tmp_path)  # beside no checkout: it imports the installed wheel
    out = _run([str(fresh_env), "mnist_fwdgrad.py"], cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "fwdgrad[experiments]" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1  # one paragraph
