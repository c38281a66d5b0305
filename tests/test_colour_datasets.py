"""CIFAR-10 and SVHN from small files written in torchvision's own formats (python pickle batches; MATLAB .mat
through scipy.io.savemat): decoded as torchvision decodes them, labels (SVHN's 10 is the digit 0), per-channel
normalisation, MD5 checks, damaged files and the offline message."""

from __future__ import annotations

import pickle
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import scipy.io
import torch
from hydra.utils import instantiate
from torchvision.datasets import CIFAR10, SVHN

from fwdgrad.experiments import data
from fwdgrad.experiments.data import CorruptDatasetError, DatasetNotFoundError
from mnist_helpers import compose_cfg

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


def fake_cifar10(root: Path, per_batch: int = 6, n_test: int = 5) -> dict:
    """``<root>/cifar-10-batches-py/`` with five training batches, a test batch and the meta file, pickled as the
    published ones are (protocol 2, ``data`` as (N, 3072) uint8 rows: red, green, blue planes)."""
    folder = root / CIFAR10.base_folder
    folder.mkdir(parents=True)
    made = {"train_x": [], "train_y": []}
    for i, (name, _) in enumerate(CIFAR10.train_list):
        x, y = _images(per_batch, i), [(i + j) % 10 for j in range(per_batch)]
        (folder / name).write_bytes(pickle.dumps({"batch_label": name, "data": x.reshape(per_batch, -1),
                                                  "labels": y, "filenames": [f"{j}.png" for j in y]}, protocol=2))
        made["train_x"].append(x)
        made["train_y"] += y
    x, y = _images(n_test, 99), [j % 10 for j in range(n_test)]
    (folder / CIFAR10.test_list[0][0]).write_bytes(
        pickle.dumps({"batch_label": "test", "data": x.reshape(n_test, -1), "labels": y}, protocol=2))
    (folder / CIFAR10.meta["filename"]).write_bytes(pickle.dumps({"label_names": CIFAR_CLASSES}, protocol=2))
    made.update(train_x=np.concatenate(made["train_x"]), test_x=x, test_y=y)
    return made


def fake_svhn(root: Path, n_train: int = 23, n_test: int = 11) -> dict:
    """``<root>/{train,test}_32x32.mat`` as the published files: ``X`` (32, 32, 3, N) uint8, ``y`` (N, 1) labels
    1..10 (10 for the digit 0)."""
    root.mkdir(parents=True, exist_ok=True)
    made = {}
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        x = _images(n, seed)
        digits = np.arange(n) % 10
        scipy.io.savemat(str(root / SVHN.split_list[split][1]),
                         {"X": x.transpose(2, 3, 1, 0), "y": np.where(digits == 0, 10, digits).astype(np.uint8)[:, None]})
        made[split] = (x, digits)
    return made


def _undo(s: data.Splits, x: torch.Tensor) -> torch.Tensor:
    """The [0, 1] pixels a split was normalised from."""
    return x * torch.tensor(s.std).view(1, 3, 1, 1) + torch.tensor(s.mean).view(1, 3, 1, 1)


def _check_normalised(s: data.Splits) -> None:
    # each channel standardised with the training split's own statistics
    assert torch.allclose(s.train_x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(s.train_x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4)
    assert s.train_x.dtype == torch.float32 and s.train_y.dtype == torch.int64


# -- CIFAR-10 ----------------------------------------------------------------------------------------------------
def test_cifar10_decodes_the_pickle_batches(tmp_path: Path):
    made = fake_cifar10(tmp_path)
    s = data.cifar10(root=str(tmp_path), download=False, check_md5=False)
    assert s.train_x.shape == (30, 3, 32, 32) and s.test_x.shape == (5, 3, 32, 32)
    assert s.input_shape == (3, 32, 32) and s.num_classes == 10 and s.class_names == tuple(CIFAR_CLASSES)
    assert s.train_y.tolist() == made["train_y"] and s.test_y.tolist() == made["test_y"]
    torch.testing.assert_close(_undo(s, s.train_x), torch.from_numpy(made["train_x"]).float() / 255, atol=2e-6,
                               rtol=0)
    torch.testing.assert_close(_undo(s, s.test_x), torch.from_numpy(made["test_x"]).float() / 255, atol=2e-6, rtol=0)
    _check_normalised(s)


def test_cifar10_reads_what_torchvision_reads(tmp_path: Path, monkeypatch):
    fake_cifar10(tmp_path)
    # torchvision accepts only the published files: switch its checksums off for the reference reading
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *a, **k: True)
    ref = CIFAR10(str(tmp_path), train=True)
    s = data.cifar10(root=str(tmp_path), download=False, check_md5=False)
    pixels = torch.from_numpy(ref.data).permute(0, 3, 1, 2).float() / 255  # torchvision keeps HWC
    torch.testing.assert_close(_undo(s, s.train_x), pixels, atol=2e-6, rtol=0)
    assert s.train_y.tolist() == ref.targets and list(s.class_names) == ref.classes


def test_cifar10_checks_md5_and_names_a_damaged_file(tmp_path: Path):
    fake_cifar10(tmp_path)
    with pytest.raises(CorruptDatasetError, match="MD5 differs") as err:
        data.cifar10(root=str(tmp_path), download=False)  # generated files are not the published ones
    assert "data_batch_1" in str(err.value) and "check_md5=false" in str(err.value)
    victim = tmp_path / CIFAR10.base_folder / "data_batch_3"
    victim.write_bytes(victim.read_bytes()[:200])
    with pytest.raises(CorruptDatasetError, match="cannot decode") as err:
        data.cifar10(root=str(tmp_path), download=False, check_md5=False)
    assert str(victim) in str(err.value)


def test_cifar10_failed_download_message(tmp_path: Path, monkeypatch):
    def offline(self):
        raise URLError("no network")

    monkeypatch.setattr(CIFAR10, "download", offline)
    with pytest.raises(DatasetNotFoundError, match="downloading them failed") as err:
        data.cifar10(root=str(tmp_path), download=True)
    msg = str(err.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg and "data_batch_1" in msg and "dataset=digits" in msg


# -- SVHN --------------------------------------------------------------------------------------------------------
def test_svhn_decodes_the_mat_files_and_maps_label_10_to_digit_0(tmp_path: Path):
    made = fake_svhn(tmp_path)
    s = data.svhn(root=str(tmp_path), download=False, check_md5=False)
    assert s.train_x.shape == (23, 3, 32, 32) and s.test_x.shape == (11, 3, 32, 32)
    assert s.input_shape == (3, 32, 32) and s.num_classes == 10 and s.class_names == tuple("0123456789")
    assert s.train_y.tolist() == made["train"][1].tolist() and s.test_y.tolist() == made["test"][1].tolist()
    assert 0 in s.train_y.tolist() and int(s.train_y.max()) == 9  # the .mat files' 10s are zeros here
    torch.testing.assert_close(_undo(s, s.train_x), torch.from_numpy(made["train"][0]).float() / 255, atol=2e-6,
                               rtol=0)
    _check_normalised(s)


def test_svhn_reads_what_torchvision_reads(tmp_path: Path, monkeypatch):
    fake_svhn(tmp_path)
    monkeypatch.setattr(SVHN, "_check_integrity", lambda self: True)
    s = data.svhn(root=str(tmp_path), download=False, check_md5=False)
    for split, x in (("train", s.train_x), ("test", s.test_x)):
        ref = SVHN(str(tmp_path), split=split)
        torch.testing.assert_close(_undo(s, x), torch.from_numpy(ref.data).float() / 255, atol=2e-6, rtol=0)
        assert (s.train_y if split == "train" else s.test_y).tolist() == ref.labels.tolist()


def test_svhn_checks_md5_names_a_damaged_file_and_says_what_is_missing(tmp_path: Path):
    fake_svhn(tmp_path)
    with pytest.raises(CorruptDatasetError, match="MD5 differs"):
        data.svhn(root=str(tmp_path), download=False)
    victim = tmp_path / "test_32x32.mat"
    victim.write_bytes(b"MATLAB 5.0 MAT-file, but then nothing")
    with pytest.raises(CorruptDatasetError, match="cannot decode") as err:
        data.svhn(root=str(tmp_path), download=False, check_md5=False)
    assert str(victim) in str(err.value)
    victim.unlink()
    with pytest.raises(DatasetNotFoundError) as err:
        data.svhn(root=str(tmp_path), download=False)
    msg = str(err.value)
    assert "missing test_32x32.mat" in msg and "download was disabled" in msg and "dataset=digits" in msg
    assert "\n" not in msg


def test_svhn_config_composes_and_loads_limits(tmp_path: Path):
    fake_svhn(tmp_path)
    cfg = compose_cfg("mnist_fwdgrad", ["dataset=svhn", f"dataset.root={tmp_path}", "dataset.check_md5=false",
                                        "dataset.limit_train=10", "dataset.limit_test=4", "dataset.batch_size=5"])
    s = instantiate(cfg.dataset)
    assert s.name == "svhn" and s.train_x.shape[0] == 10 and s.test_x.shape[0] == 4 and s.batch_size == 5


def test_svhn_downloads_each_missing_split_with_torchvision(tmp_path: Path, monkeypatch):
    source = tmp_path / "server"
    fake_svhn(source)
    fetched = []

    def download(self):  # torchvision's downloader, "online": it fetches this split's file into root
        fetched.append(self.split)
        (Path(self.root) / self.filename).write_bytes((source / self.filename).read_bytes())

    monkeypatch.setattr(SVHN, "download", download)
    root = tmp_path / "data"
    root.mkdir()
    (root / "train_32x32.mat").write_bytes((source / "train_32x32.mat").read_bytes())  # one split already there
    s = data.svhn(root=str(root), download=True, check_md5=False)
    assert fetched == ["test"] and s.test_x.shape == (11, 3, 32, 32)
