"""Importing fwdgrad changes nothing outside fwdgrad (the library issue's first point).

Two fresh interpreters. The first imports torch alone, imports the core and uses it (a forward-gradient step
through a custom ``autograd.Function``, so the engine's pass-scoped hook is entered and left), and reports what
a host program could notice and which of the experiments' packages got loaded. The second loads matplotlib and
OmegaConf first, so that their global state can be recorded too, then imports every module of the package.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_SNAPSHOT = textwrap.dedent("""
    import json, logging, os, sys, warnings
    import torch

    def snapshot(extras=False):
        loggers = [logging.getLogger()] + [l for l in logging.Logger.manager.loggerDict.values()
                                            if isinstance(l, logging.Logger)]
        out = {
            "Function.apply": repr(torch.autograd.Function.__dict__["apply"]),
            "os.environ": dict(os.environ),
            "logging handlers": sorted(f"{l.name}:{h!r}" for l in loggers for h in l.handlers),
            "warning filters": len(warnings.filters),
            "torch threads": torch.get_num_threads(),
            "torch default dtype": str(torch.get_default_dtype()),
        }
        if extras:
            import matplotlib
            from omegaconf.basecontainer import BaseContainer
            out["matplotlib backend"] = repr(dict.__getitem__(matplotlib.rcParams, "backend"))
            out["OmegaConf resolvers"] = sorted(BaseContainer._resolvers)
        return out
""")

_CORE = _SNAPSHOT + textwrap.dedent("""
    HEAVY = ("hydra", "omegaconf", "matplotlib", "pandas", "tensorboard", "sklearn", "tqdm", "torchvision",
             "scipy", "optuna")
    # torch loads some modules lazily, on first use of its APIs, and they may change the process (sympy adds a
    # warning filter): use those APIs once first, so that only fwdgrad's own effects remain to be seen
    torch.func.jvp(lambda a: a * a, (torch.ones(1),), (torch.ones(1),))
    import sympy  # noqa: F401  (loaded by torch's symbolic shapes)
    before = snapshot()
    torch_loads = {m.split(".")[0] for m in sys.modules}  # torch itself may load some (tqdm, by torch.hub)
    import fwdgrad
    from fwdgrad import ForwardGradient, ZerothOrder, estimate_module_grads
    import fwdgrad.engine, fwdgrad.estimators, fwdgrad.nn.functional, fwdgrad.nn.models, fwdgrad.parallel

    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return 2 * x
        @staticmethod
        def backward(ctx, g):
            return 2 * g
        @staticmethod
        def jvp(ctx, t):
            return 2 * t

    model = fwdgrad.nn.models.MLP(input_shape=(1, 4, 4), num_classes=3)
    x, y = torch.randn(5, 1, 4, 4), torch.randint(0, 3, (5,))
    loss = lambda out: fwdgrad.nn.functional.cross_entropy(Twice.apply(out), y)
    estimate_module_grads(ForwardGradient(seed=0, backend="fast"), model, loss, x)
    estimate_module_grads(ZerothOrder(seed=0), model, loss, x)
    print(json.dumps({"before": before, "after": snapshot(),
                      "loaded": sorted(({m.split(".")[0] for m in sys.modules} - torch_loads) & set(HEAVY))}))
""")

_EVERYTHING = _SNAPSHOT + textwrap.dedent("""
    before = snapshot(extras=True)
    import importlib, pkgutil
    import fwdgrad
    names = [info.name for info in pkgutil.walk_packages(fwdgrad.__path__, "fwdgrad.")]
    for name in names:
        importlib.import_module(name)
    print(json.dumps({"before": before, "after": snapshot(extras=True), "imported": len(names)}))
""")


def _run(code: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def core_probe() -> dict:
    return _run(_CORE)


def _assert_unchanged(probe: dict) -> None:
    changed = [key for key, value in probe["before"].items() if probe["after"][key] != value]
    assert changed == [], f"changed by fwdgrad: {changed}"


def test_importing_and_using_the_core_changes_nothing_outside_it(core_probe):
    _assert_unchanged(core_probe)


def test_the_core_loads_none_of_the_experiments_packages(core_probe):
    assert core_probe["loaded"] == []


def test_importing_every_module_changes_nothing_outside_fwdgrad():
    probe = _run(_EVERYTHING)
    assert probe["imported"] > 50  # every module was reached
    _assert_unchanged(probe)


def test_the_probe_sees_a_change():
    # The check itself: a module that sets a variable and a resolver is caught.
    code = _SNAPSHOT + textwrap.dedent("""
        before = snapshot(extras=True)
        os.environ["FWDGRAD_PROBE"] = "1"
        from omegaconf import OmegaConf
        OmegaConf.register_new_resolver("probe_resolver", lambda: 1)
        print(json.dumps({"before": before, "after": snapshot(extras=True)}))
    """)
    probe = _run(code)
    with pytest.raises(AssertionError, match="os.environ.*OmegaConf resolvers"):
        _assert_unchanged(probe)
