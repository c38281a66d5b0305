"""In-memory datasets: splits, normalisation, batching by index, IDX decoding, offline and broken-file errors."""

from __future__ import annotations

import os

import gzip
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch

from fwdgrad.experiments import data
from fwdgrad.experiments.data import CorruptDatasetError, DatasetNotFoundError, iterate_batches, read_idx
from fwdgrad.errors import ConfigError
from mnist_helpers import write_idx as _write_idx


def _fake_mnist(root: Path, n: int = 50, parts=("t10k",), compress: bool = True) -> None:
    """A tiny MNIST-format folder: image i is filled with the value i, its label is i % 10."""
    for part in parts:
        images = np.stack([np.full((28, 28), i % 256) for i in range(n)])
        _write_idx(root / "MNIST" / "raw" / f"{part}-images-idx3-ubyte", images, compress)
        _write_idx(root / "MNIST" / "raw" / f"{part}-labels-idx1-ubyte", np.arange(n) % 10, compress)


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path: Path, compress: bool):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = _write_idx(tmp_path / "x-idx3-ubyte", arr, compress)
    out = read_idx(path)
    assert out.dtype == torch.uint8 and out.shape == (2, 3, 4)
    assert torch.equal(out, torch.from_numpy(arr))


@pytest.mark.parametrize("damage", ["truncated_gzip", "bad_header", "wrong_size"])
def test_broken_file_is_named(tmp_path: Path, damage: str):
    _fake_mnist(tmp_path)
    raw = tmp_path / "MNIST" / "raw"
    victim = raw / "t10k-images-idx3-ubyte.gz"
    if damage == "truncated_gzip":
        victim.write_bytes(victim.read_bytes()[:100])
    elif damage == "bad_header":
        with gzip.open(victim, "wb") as f:
            f.write(b"not an idx file at all")
    else:
        with gzip.open(victim, "wb") as f:
            f.write(bytes([0, 0, 8, 3]) + (50).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\0" * 10)
    with pytest.raises(CorruptDatasetError) as err:
        data.mnist(root=str(tmp_path), download=False, test_set_split=10)
    assert str(victim) in str(err.value)


def test_mismatched_images_and_labels(tmp_path: Path):
    _fake_mnist(tmp_path)
    _write_idx(tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", np.arange(7) % 10)
    with pytest.raises(CorruptDatasetError, match="do not match"):
        data.mnist(root=str(tmp_path), download=False, test_set_split=10)


def test_test_set_split_uses_only_t10k(tmp_path: Path):
    _fake_mnist(tmp_path, n=50, parts=("t10k",))
    s = data.mnist(root=str(tmp_path), download=False, test_set_split=10, split_seed=3)
    assert s.train_x.shape == (40, 1, 28, 28) and s.test_x.shape == (10, 1, 28, 28)
    assert s.input_shape == (1, 28, 28) and s.num_classes == 10 and s.is_image
    # Undo the normalisation to recover which source image went where: the split is a partition of all 50.
    ids = lambda x: torch.round((x[:, 0, 0, 0] * s.std[0] + s.mean[0]) * 255).long()  # noqa: E731
    train_ids, test_ids = ids(s.train_x), ids(s.test_x)
    assert sorted(torch.cat([train_ids, test_ids]).tolist()) == list(range(50))
    assert torch.equal(s.train_y, train_ids % 10) and torch.equal(s.test_y, test_ids % 10)
    # The split is fixed by split_seed, not by chance.
    again = data.mnist(root=str(tmp_path), download=False, test_set_split=10, split_seed=3)
    other = data.mnist(root=str(tmp_path), download=False, test_set_split=10, split_seed=4)
    assert torch.equal(again.test_x, s.test_x) and not torch.equal(other.test_x, s.test_x)


def test_normalize_none_keeps_the_pixels_in_0_1(tmp_path: Path):
    # orobix/fwdgrad feeds ToTensor()'s [0, 1] pixels: image i (all pixels i) must come out as exactly i / 255.
    _fake_mnist(tmp_path, n=50, parts=("t10k",))
    raw = data.mnist(root=str(tmp_path), download=False, test_set_split=10, normalize="none")
    std = data.mnist(root=str(tmp_path), download=False, test_set_split=10)
    assert raw.mean == (0.0,) and raw.std == (1.0,)  # the plots' inverse x * std + mean is the identity
    assert raw.train_x.dtype == torch.float32 and raw.train_x.is_contiguous()
    for x in (raw.train_x, raw.test_x):
        ids = torch.round(x[:, 0, 0, 0] * 255)
        assert torch.equal(x, (ids / 255).view(-1, 1, 1, 1).expand_as(x))
    # Same split and labels whatever the scaling; standardize maps one onto the other by the stored statistics.
    assert torch.equal(raw.train_y, std.train_y) and torch.equal(raw.test_y, std.test_y)
    torch.testing.assert_close((raw.test_x - std.mean[0]) / std.std[0], std.test_x)


def test_normalize_none_on_tabular_and_8x8_data():
    from sklearn.datasets import load_digits

    d = data.digits(normalize="none")
    assert float(d.train_x.min()) == 0.0 and float(d.train_x.max()) == 1.0  # load_digits' 0..16, divided by 16
    pool = torch.as_tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0
    assert torch.equal(torch.cat([d.train_x, d.test_x]).sum(0), pool.sum(0))  # the same images, split
    p = data.penguins(normalize="none")
    assert p.mean == (0.0,) * 4 and p.std == (1.0,) * 4
    assert 2500 < float(p.train_x[:, 3].min()) and float(p.train_x[:, 3].max()) < 6500  # body mass in grams


def test_unknown_normalize_names_the_value_and_the_choices():
    with pytest.raises(ConfigError) as err:
        data.digits(normalize="unit")
    msg = str(err.value)
    assert "'unit'" in msg and "standardize" in msg and "none" in msg and "dataset.normalize" in msg


def test_official_split_reads_plain_files(tmp_path: Path):
    _fake_mnist(tmp_path, n=30, parts=("train", "t10k"), compress=False)
    s = data.mnist(root=str(tmp_path), download=False, limit_train=20, limit_test=5)
    assert s.train_x.shape[0] == 20 and s.test_x.shape[0] == 5


def test_missing_files_offline_message(tmp_path: Path):
    with pytest.raises(DatasetNotFoundError) as err:
        data.mnist(root=str(tmp_path), download=False)
    msg = str(err.value)
    assert str(tmp_path / "MNIST" / "raw") in msg
    assert "t10k-images-idx3-ubyte" in msg and "train-labels-idx1-ubyte" in msg
    assert "dataset=digits" in msg and "dataset=penguins" in msg and "test_set_split" in msg
    assert "\n" not in msg  # one paragraph


def test_failed_download_message(tmp_path: Path, monkeypatch):
    from torchvision.datasets import FashionMNIST

    def offline(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz", URLError("no network"))

    monkeypatch.setattr(FashionMNIST, "download", offline)
    with pytest.raises(DatasetNotFoundError, match="downloading them failed") as err:
        data.fashion_mnist(root=str(tmp_path), download=True)
    assert str(tmp_path / "FashionMNIST" / "raw") in str(err.value)


def test_cifar10_missing_offline(tmp_path: Path):
    with pytest.raises(DatasetNotFoundError) as err:
        data.cifar10(root=str(tmp_path), download=False)
    assert str(tmp_path / "cifar-10-batches-py") in str(err.value) and "data_batch_1" in str(err.value)


def test_relative_root_is_taken_from_the_project(tmp_path, monkeypatch):
    # the folder of the entry points and configs (a layout move once left it pointing inside the package)
    assert (data.PROJECT_ROOT / "mnist_fwdgrad.py").is_file() and (data.PROJECT_ROOT / "configs").is_dir()
    # through the public factory: a relative root is found from any working directory
    _fake_mnist(tmp_path / "somewhere")
    monkeypatch.chdir(tmp_path)
    relative = os.path.relpath(tmp_path / "somewhere", data.PROJECT_ROOT)
    splits = data.mnist(root=relative, batch_size=4, download=False, test_set_split=10, split_seed=None)
    assert splits.train_x.shape[0] == 40


def test_a_plain_split_and_the_mnist_constants(tmp_path):
    # split_seed=None: file order, the last N held out (the reference recipe's split); normalize=mnist: the
    # fixed (0.1307, 0.3081) of torchvision's MNIST examples
    _fake_mnist(tmp_path, n=50)
    s = data.mnist(root=str(tmp_path), test_set_split=10, split_seed=None, normalize="mnist", download=False)
    assert s.train_y.tolist() == [i % 10 for i in range(40)] and s.test_y.tolist() == [i % 10 for i in range(40, 50)]
    assert s.mean == pytest.approx((0.1307,)) and s.std == pytest.approx((0.3081,))
    torch.testing.assert_close(s.train_x[3], torch.full_like(s.train_x[3], (3 / 255 - 0.1307) / 0.3081))


def test_digits_split_and_normalisation():
    s = data.digits()
    assert s.train_x.shape == (1438, 1, 8, 8) and s.test_x.shape == (359, 1, 8, 8)
    assert s.num_classes == 10 and s.input_shape == (1, 8, 8)
    # Standardised with the training split's statistics: mean 0, std 1 there, not exactly on the test split.
    assert abs(float(s.train_x.mean())) < 1e-5 and abs(float(s.train_x.std()) - 1) < 1e-3
    assert set(s.train_y.unique().tolist()) == set(range(10))
    assert torch.equal(data.digits().test_y, s.test_y)  # deterministic split


def test_penguins():
    s = data.penguins()
    assert s.train_x.shape[0] + s.test_x.shape[0] == 342  # 344 rows, 2 with missing measurements dropped
    assert s.input_shape == (4,) and not s.is_image
    assert s.num_classes == 3 and s.class_names == ("Adelie", "Chinstrap", "Gentoo")
    assert torch.isfinite(s.train_x).all() and torch.isfinite(s.test_x).all()
    assert torch.allclose(s.train_x.mean(0), torch.zeros(4), atol=1e-5)
    assert torch.allclose(s.train_x.std(0), torch.ones(4), atol=1e-4)


def test_iterate_batches_is_a_seeded_permutation():
    x = torch.arange(10).float().unsqueeze(1)
    y = torch.arange(10)
    batches = list(iterate_batches(x, y, 4, torch.Generator().manual_seed(0)))
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]  # the last batch is kept, smaller
    seen = torch.cat([b[1] for b in batches])
    assert sorted(seen.tolist()) == list(range(10)) and seen.tolist() != list(range(10))
    assert all(torch.equal(bx[:, 0].long(), by) for bx, by in batches)  # x and y stay paired
    again = torch.cat([b[1] for b in iterate_batches(x, y, 4, torch.Generator().manual_seed(0))])
    assert torch.equal(seen, again)
    in_order = torch.cat([b[1] for b in iterate_batches(x, y, 4)])
    assert in_order.tolist() == list(range(10))


@pytest.mark.data
def test_real_mnist_test_set_split(mnist_root: Path):
    s = data.mnist(root=str(mnist_root), download=False, test_set_split=2000)
    assert s.train_x.shape == (8000, 1, 28, 28) and s.test_x.shape == (2000, 1, 28, 28)
    assert s.train_y.bincount(minlength=10).min() > 600 and s.test_y.bincount(minlength=10).min() > 150
    # MNIST's well-known pixel statistics (mean 0.13, std 0.31 on [0, 1]) are what the split was normalised by.
    assert s.mean[0] == pytest.approx(0.133, abs=0.005) and s.std[0] == pytest.approx(0.310, abs=0.005)
