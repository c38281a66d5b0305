"""Shared fixtures: the real-data location and a deterministic default dtype."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
#: The official MNIST test set shipped beside the project (never committed into it); FWDGRAD_SHARED overrides
#: the location of ``shared/`` (e.g. when working in a git worktree elsewhere).
SHARED = Path(os.environ.get("FWDGRAD_SHARED", ROOT.parent / "shared"))
SHARED_MNIST = SHARED / "data" / "mnist"
MNIST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


@pytest.fixture
def mnist_root() -> Path:
    """Folder holding ``MNIST/raw/t10k-*``; the test is skipped with a reason when it is absent."""
    raw = SHARED_MNIST / "MNIST" / "raw"
    missing = [f for f in MNIST_FILES if not (raw / f).is_file()]
    if missing:
        pytest.skip(f"real MNIST test set not found in {raw} (missing {', '.join(missing)}); "
                    "these checks need ../shared/data/mnist beside the project")
    return SHARED_MNIST


@pytest.fixture(autouse=True, scope="session")
def _resolvers():
    """The configs' OmegaConf resolvers, which the entry points register (fwdgrad.app.process); the tests compose
    the same configs in this process."""
    from fwdgrad.app.resolvers import register_resolvers

    register_resolvers()


@pytest.fixture(autouse=True)
def _torch_threads():
    # Keep results independent of whatever a previous test set.
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Run the test on one torch intra-op thread (restored after): small models gain nothing from more, and on a
    busy machine a second spinning thread makes them many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
