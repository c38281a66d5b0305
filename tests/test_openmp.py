"""An entry point (never ``import fwdgrad``) shortens libgomp's spin-wait before torch loads, unless the user chose a
wait setting (fwdgrad.perf.openmp, fwdgrad.app.process)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from fwdgrad.perf.openmp import SPIN_COUNT, openmp_spin_setting, shorten_openmp_spin


def test_sets_the_spin_count_when_nothing_is_chosen():
    env: dict = {}
    assert shorten_openmp_spin(env) is True
    assert env == {"GOMP_SPINCOUNT": str(SPIN_COUNT)}
    assert openmp_spin_setting(env) == f"GOMP_SPINCOUNT={SPIN_COUNT}"


@pytest.mark.parametrize("choice", [{"GOMP_SPINCOUNT": "300000"}, {"OMP_WAIT_POLICY": "active"},
                                    {"OMP_WAIT_POLICY": "passive"}])
def test_a_users_choice_wins(choice):
    env = dict(choice)
    assert shorten_openmp_spin(env) is False
    assert env == choice  # OMP_WAIT_POLICY alone is not overridden by a GOMP_SPINCOUNT of ours
    assert openmp_spin_setting(env) == ", ".join(f"{k}={v}" for k, v in choice.items())


def test_default_is_reported_as_libgomps():
    assert "default" in openmp_spin_setting({})


# The value the environment holds at the moment torch is first imported: libgomp reads it then, once.
_PROBE = textwrap.dedent("""
    import importlib.abc, os, sys
    seen = []
    class Watch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "torch" and not seen:
                seen.append(os.environ.get("GOMP_SPINCOUNT", "unset"))
            return None
    sys.meta_path.insert(0, Watch())
    import fwdgrad, fwdgrad.perf.openmp, fwdgrad.app.process  # importing changes nothing
    assert "GOMP_SPINCOUNT" not in os.environ or os.environ.get("GOMP_SPINCOUNT") == os.environ.get("KEEP")
    from fwdgrad.app.process import prepare_process
    prepare_process()  # what every entry point does first
    import torch
    print(seen[0])
""")


def _probe(extra_env: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update(extra_env)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_an_entry_point_sets_it_before_torch_loads():
    assert _probe({}) == str(SPIN_COUNT)


def test_an_entry_point_keeps_a_wait_policy():
    assert _probe({"OMP_WAIT_POLICY": "passive"}) == "unset"
