"""Datasets decoded once into in-memory tensors and batched by index.

Every factory here (the ``_target_`` of a ``configs/dataset/*.yaml``) returns a :class:`Splits`: normalised
float32 inputs (images as ``(N, C, H, W)``, tabular rows as ``(N, F)``), int64 labels, and what a model needs
to know about them (``input_shape``, ``num_classes``). Batches are drawn by indexing those tensors with a
permutation from a seeded ``torch.Generator`` (:func:`iterate_batches`): no ``DataLoader``, no per-sample
transforms, so on MNIST an epoch costs a few ``index_select`` calls, not 60,000 PIL conversions.

Sources
-------
* ``mnist``, ``fashion_mnist``, ``kmnist``: the IDX files of torchvision's ``MNIST``/``FashionMNIST``/
  ``KMNIST`` classes, read from ``<root>/<ClassName>/raw/`` (plain or ``.gz``). Missing files are downloaded
  with the torchvision class when ``download`` is true and the network is reachable.
  ``test_set_split=N`` uses *only* the official 10k test set (``t10k-*``): a fixed permutation seeded by
  ``split_seed`` keeps ``N`` examples held out and trains on the rest. This is how the MNIST test set shipped
  beside the project (``../shared/data/mnist``, test files only) gives real digits offline.
* ``cifar10``: torchvision's ``CIFAR10`` (``<root>/cifar-10-batches-py``), converted to tensors once.
* ``digits`` (scikit-learn's 8x8 digits, as 1x8x8 images) and ``penguins`` (palmerpenguins): shipped with
  their packages, hence always available offline; split by a fixed permutation seeded by ``split_seed``.

Normalisation (``normalize``, every factory): ``standardize`` (the default) standardises each input channel
(images) or feature (tabular) with the mean and standard deviation of the *training* split, so nothing about
the held-out data leaks into training; ``none`` keeps the source's own scale: pixels in [0, 1] (what
torchvision's ``ToTensor`` gives, and what the reference implementation orobix/fwdgrad trains on), tabular
features raw.
"""

from __future__ import annotations

import gzip
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple, Type

import numpy as np
import torch
from torch import Tensor

from fwdgrad.errors import ConfigError, CorruptDatasetError, DatasetError, DatasetNotFoundError

__all__ = [
    "Splits",
    "NORMALIZATIONS",
    "DatasetError",
    "DatasetNotFoundError",
    "CorruptDatasetError",
    "PROJECT_ROOT",
    "OFFLINE_ALTERNATIVES",
    "iterate_batches",
    "read_idx",
    "mnist",
    "fashion_mnist",
    "kmnist",
    "cifar10",
    "digits",
    "penguins",
]

log = logging.getLogger(__name__)

#: Relative ``dataset.root`` values are taken relative to the project root (the folder of ``mnist_fwdgrad.py``),
#: so ``root: data`` means ``<project>/data`` whatever the current directory.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
OFFLINE_ALTERNATIVES = "dataset=digits or dataset=penguins"
#: Values of every factory's ``normalize`` argument (``dataset.normalize``): see the module docstring.
NORMALIZATIONS = ("standardize", "none")


@dataclass
class Splits:
    """A dataset held in memory: train and held-out tensors plus what the model needs to know."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    input_shape: Tuple[int, ...]
    num_classes: int
    name: str
    batch_size: int = 64
    class_names: Tuple[str, ...] = ()
    #: Per-channel (images) or per-feature (tabular) statistics used to normalise; plots undo them.
    mean: Tuple[float, ...] = field(default_factory=tuple)
    std: Tuple[float, ...] = field(default_factory=tuple)

    @property
    def is_image(self) -> bool:
        """Images are ``(C, H, W)``; tabular rows are ``(F,)``."""
        return len(self.input_shape) == 3

    def to(self, device: torch.device | str) -> "Splits":
        """The same splits with all tensors on ``device`` (copied once, before training)."""
        return replace(
            self,
            train_x=self.train_x.to(device),
            train_y=self.train_y.to(device),
            test_x=self.test_x.to(device),
            test_y=self.test_y.to(device),
        )

    def describe(self) -> dict:
        return {
            "name": self.name,
            "train_size": int(self.train_x.shape[0]),
            "test_size": int(self.test_x.shape[0]),
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "batch_size": self.batch_size,
        }


def iterate_batches(
    x: Tensor, y: Tensor, batch_size: int, generator: Optional[torch.Generator] = None
) -> Iterator[Tuple[Tensor, Tensor]]:
    """Yield ``(x[idx], y[idx])`` batches; shuffled by a permutation from ``generator`` if one is given.

    The permutation is drawn on the CPU (so the same seed gives the same order on every device) and moved to
    the data's device once per epoch. The last batch may be smaller (nothing is dropped).
    """
    n = x.shape[0]
    if generator is None:
        for start in range(0, n, batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]
        return
    perm = torch.randperm(n, generator=generator).to(x.device)
    for start in range(0, n, batch_size):
        idx = perm[start : start + batch_size]
        yield x.index_select(0, idx), y.index_select(0, idx)


# --------------------------------------------------------------------------------------------------------
# helpers shared by the factories
# --------------------------------------------------------------------------------------------------------
def _resolve_root(root: str | os.PathLike) -> Path:
    p = Path(os.path.expanduser(str(root)))
    return p if p.is_absolute() else PROJECT_ROOT / p


def _seeded_permutation(n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=g)


def _normalise(train_x: Tensor, test_x: Tensor, how: str
               ) -> Tuple[Tensor, Tensor, Tuple[float, ...], Tuple[float, ...]]:
    """Scale the inputs as ``how`` (:data:`NORMALIZATIONS`) says; return them with the per-channel
    ``(mean, std)`` that maps them back, ``x_source = x * std + mean``.

    ``standardize``: per channel (dim 1) with statistics of the training split only. ``none``: unchanged
    (``mean = 0``, ``std = 1``, so the plots' inverse is the identity).
    """
    if how not in NORMALIZATIONS:
        raise ConfigError(
            f"unknown dataset.normalize {how!r}; allowed: {', '.join(NORMALIZATIONS)} (standardize: per "
            "channel with the training split's statistics; none: the source's own scale, e.g. pixels in "
            "[0, 1])."
        )
    dims = [d for d in range(train_x.dim()) if d != 1]
    if how == "standardize":
        mean = train_x.mean(dim=dims, keepdim=True)
        std = train_x.std(dim=dims, keepdim=True).clamp_min(1e-8)
    else:  # none
        shape = [1 if d in dims else train_x.shape[d] for d in range(train_x.dim())]
        mean, std = torch.zeros(shape, dtype=train_x.dtype), torch.ones(shape, dtype=train_x.dtype)
    norm = lambda t: ((t - mean) / std).float().contiguous()  # noqa: E731
    return norm(train_x), norm(test_x), tuple(mean.flatten().tolist()), tuple(std.flatten().tolist())


def _finish(
    name: str,
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
    batch_size: int,
    class_names: Sequence[str],
    limit_train: Optional[int],
    limit_test: Optional[int],
    normalize: str = "standardize",
) -> Splits:
    """Apply the optional size limits, normalise as ``normalize`` says (:data:`NORMALIZATIONS`), and wrap into
    :class:`Splits`."""
    if limit_train is not None:
        train_x, train_y = train_x[: int(limit_train)], train_y[: int(limit_train)]
    if limit_test is not None:
        test_x, test_y = test_x[: int(limit_test)], test_y[: int(limit_test)]
    if train_x.shape[0] == 0 or test_x.shape[0] == 0:
        raise DatasetError(
            f"dataset {name!r} has {train_x.shape[0]} training and {test_x.shape[0]} held-out examples after the "
            "split/limits; both must be at least 1 (check dataset.test_set_split / limit_train / limit_test)."
        )
    if int(batch_size) < 1:
        raise DatasetError(f"dataset.batch_size must be >= 1, got {batch_size}.")
    train_x, test_x, mean, std = _normalise(train_x.float(), test_x.float(), normalize)
    return Splits(
        train_x=train_x,
        train_y=train_y.long().contiguous(),
        test_x=test_x,
        test_y=test_y.long().contiguous(),
        input_shape=tuple(int(s) for s in train_x.shape[1:]),
        num_classes=int(num_classes),
        name=name,
        batch_size=int(batch_size),
        class_names=tuple(str(c) for c in class_names),
        mean=mean,
        std=std,
    )


def _split_one(x: Tensor, y: Tensor, held_out: int, seed: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Split one pool into (train, held-out) by a fixed permutation seeded by ``seed``."""
    n = x.shape[0]
    if not 0 < held_out < n:
        raise DatasetError(
            f"cannot hold out {held_out} of {n} examples; choose a number between 1 and {n - 1}."
        )
    perm = _seeded_permutation(n, seed)
    test_idx, train_idx = perm[:held_out], perm[held_out:]
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


# --------------------------------------------------------------------------------------------------------
# MNIST-like IDX datasets through torchvision
# --------------------------------------------------------------------------------------------------------
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> Tensor:
    """Decode one IDX file (plain or gzip-compressed) into a tensor; a broken file raises
    :class:`CorruptDatasetError` naming it.

    Format: two zero bytes, a type code, the number of dimensions ``d``, ``d`` big-endian int32 sizes, then the
    data in row-major order.
    """
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise CorruptDatasetError(
            f"cannot read {path}: {e}. The file is damaged; delete it and download it again "
            "(dataset.download=true), or use the offline datasets: " + OFFLINE_ALTERNATIVES + "."
        ) from None

    def broken(why: str) -> CorruptDatasetError:
        return CorruptDatasetError(
            f"{path} is not a valid IDX file ({why}). The file is damaged; delete it and download it again "
            "(dataset.download=true), or use the offline datasets: " + OFFLINE_ALTERNATIVES + "."
        )

    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or not 1 <= raw[3] <= 4:
        raise broken("bad header")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise broken("truncated header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise broken(f"{len(raw) - header} data bytes for shape {shape}, expected {expected}")
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True))


def _idx_file(raw_dir: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz"):
        if (raw_dir / name).is_file():
            return raw_dir / name
    return None


def _idx_dataset(
    cls: Type,
    name: str,
    root: str,
    batch_size: int,
    download: bool,
    test_set_split: Optional[int],
    split_seed: int,
    limit_train: Optional[int],
    limit_test: Optional[int],
    normalize: str,
) -> Splits:
    """Load an MNIST-format dataset of torchvision class ``cls`` (MNIST, FashionMNIST, KMNIST)."""
    root_dir = _resolve_root(root)
    raw_dir = root_dir / cls.__name__ / "raw"
    parts = ["t10k"] if test_set_split is not None else ["train", "t10k"]
    stems = [f"{p}-{kind}" for p in parts for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]

    def missing() -> list[str]:
        return [s for s in stems if _idx_file(raw_dir, s) is None]

    if missing() and download:
        log.info("downloading %s into %s", name, root_dir)
        try:
            # torchvision's own downloader (mirrors, md5 checks, extraction); it fetches all four files.
            cls(str(root_dir), train=True, download=True)
        except Exception as e:  # offline: URLError, OSError, RuntimeError from every mirror
            log.debug("download of %s failed: %r", name, e)
    if missing():
        how = "download was disabled (dataset.download=false)" if not download else "downloading them failed (offline?)"
        raise DatasetNotFoundError(
            f"{name} files not found in {raw_dir}: missing {', '.join(s + '[.gz]' for s in missing())}, and {how}. "
            f"Put the files there, point dataset.root at a folder holding {cls.__name__}/raw/, or run offline with "
            f"{OFFLINE_ALTERNATIVES} (shipped with their Python packages)."
            + (
                ""
                if test_set_split is not None
                else " With only the official test set (t10k files), add dataset.test_set_split=2000."
            )
        )

    def load(part: str) -> Tuple[Tensor, Tensor]:
        x = read_idx(_idx_file(raw_dir, f"{part}-images-idx3-ubyte"))
        y = read_idx(_idx_file(raw_dir, f"{part}-labels-idx1-ubyte"))
        if x.dim() != 3 or y.dim() != 1 or x.shape[0] != y.shape[0]:
            raise CorruptDatasetError(
                f"{raw_dir}/{part}-*: images of shape {tuple(x.shape)} do not match labels of shape "
                f"{tuple(y.shape)}; one of the files is damaged or from another dataset."
            )
        return x.unsqueeze(1).float().div_(255.0), y.long()

    if test_set_split is not None:
        x, y = load("t10k")
        train_x, train_y, test_x, test_y = _split_one(x, y, int(test_set_split), split_seed)
    else:
        train_x, train_y = load("train")
        test_x, test_y = load("t10k")
    return _finish(name, train_x, train_y, test_x, test_y, len(cls.classes), batch_size, cls.classes,
                   limit_train, limit_test, normalize)


def mnist(
    root: str = "data",
    batch_size: int = 64,
    download: bool = True,
    test_set_split: Optional[int] = None,
    split_seed: int = 0,
    limit_train: Optional[int] = None,
    limit_test: Optional[int] = None,
    normalize: str = "standardize",
) -> Splits:
    """MNIST handwritten digits, 1x28x28, 10 classes (60,000 train / 10,000 test).

    ``test_set_split=N``: use only the official test set, ``N`` held out and ``10,000 - N`` for training.
    """
    from torchvision.datasets import MNIST

    return _idx_dataset(MNIST, "mnist", root, batch_size, download, test_set_split, split_seed, limit_train,
                        limit_test, normalize)


def fashion_mnist(
    root: str = "data",
    batch_size: int = 64,
    download: bool = True,
    test_set_split: Optional[int] = None,
    split_seed: int = 0,
    limit_train: Optional[int] = None,
    limit_test: Optional[int] = None,
    normalize: str = "standardize",
) -> Splits:
    """Fashion-MNIST clothing images, 1x28x28, 10 classes (60,000 / 10,000)."""
    from torchvision.datasets import FashionMNIST

    return _idx_dataset(FashionMNIST, "fashion_mnist", root, batch_size, download, test_set_split, split_seed,
                        limit_train, limit_test, normalize)


def kmnist(
    root: str = "data",
    batch_size: int = 64,
    download: bool = True,
    test_set_split: Optional[int] = None,
    split_seed: int = 0,
    limit_train: Optional[int] = None,
    limit_test: Optional[int] = None,
    normalize: str = "standardize",
) -> Splits:
    """Kuzushiji-MNIST cursive Japanese characters, 1x28x28, 10 classes (60,000 / 10,000)."""
    from torchvision.datasets import KMNIST

    return _idx_dataset(KMNIST, "kmnist", root, batch_size, download, test_set_split, split_seed, limit_train,
                        limit_test, normalize)


# --------------------------------------------------------------------------------------------------------
# CIFAR-10 through torchvision
# --------------------------------------------------------------------------------------------------------
def cifar10(
    root: str = "data",
    batch_size: int = 64,
    download: bool = True,
    limit_train: Optional[int] = None,
    limit_test: Optional[int] = None,
    normalize: str = "standardize",
) -> Splits:
    """CIFAR-10 colour images, 3x32x32, 10 classes (50,000 / 10,000), read by torchvision's ``CIFAR10``."""
    import pickle

    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity

    root_dir = _resolve_root(root)
    folder = root_dir / CIFAR10.base_folder
    files = [f for f, _ in CIFAR10.train_list + CIFAR10.test_list] + [CIFAR10.meta["filename"]]

    def absent() -> list[str]:
        return [f for f in files if not (folder / f).is_file()]

    if absent() and download:
        log.info("downloading cifar10 into %s", root_dir)
        try:
            CIFAR10(str(root_dir), train=True, download=True)
        except Exception as e:  # offline
            log.debug("download of cifar10 failed: %r", e)
    if absent():
        how = "download was disabled (dataset.download=false)" if not download else "downloading them failed (offline?)"
        raise DatasetNotFoundError(
            f"cifar10 files not found in {folder}: missing {', '.join(absent())}, and {how}. Put the extracted "
            f"cifar-10-python.tar.gz there, point dataset.root at its parent, or run offline with "
            f"{OFFLINE_ALTERNATIVES} (shipped with their Python packages)."
        )
    for f, md5 in CIFAR10.train_list + CIFAR10.test_list + [[CIFAR10.meta["filename"], CIFAR10.meta["md5"]]]:
        if not check_integrity(str(folder / f), md5):
            raise CorruptDatasetError(
                f"{folder / f} is damaged (md5 mismatch); delete it and download again (dataset.download=true), "
                f"or use the offline datasets: {OFFLINE_ALTERNATIVES}."
            )
    try:
        train, test = CIFAR10(str(root_dir), train=True), CIFAR10(str(root_dir), train=False)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise CorruptDatasetError(f"cannot decode CIFAR-10 in {folder}: {e}") from None

    def to_tensors(ds) -> Tuple[Tensor, Tensor]:
        # torchvision keeps HWC uint8; convert once to (N, C, H, W) floats in [0, 1].
        x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).float().div_(255.0)
        return x, torch.as_tensor(ds.targets, dtype=torch.long)

    train_x, train_y = to_tensors(train)
    test_x, test_y = to_tensors(test)
    return _finish("cifar10", train_x, train_y, test_x, test_y, 10, batch_size, train.classes, limit_train,
                   limit_test, normalize)


# --------------------------------------------------------------------------------------------------------
# Offline datasets shipped with their packages
# --------------------------------------------------------------------------------------------------------
def digits(
    batch_size: int = 64,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    limit_train: Optional[int] = None,
    limit_test: Optional[int] = None,
    normalize: str = "standardize",
) -> Splits:
    """scikit-learn's handwritten digits: 1,797 images of 8x8 pixels (values 0..16) as 1x8x8, 10 classes."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.as_tensor(d.target, dtype=torch.long)
    held_out = int(round(test_fraction * x.shape[0]))
    train_x, train_y, test_x, test_y = _split_one(x, y, held_out, split_seed)
    return _finish("digits", train_x, train_y, test_x, test_y, 10, batch_size, [str(i) for i in range(10)],
                   limit_train, limit_test, normalize)


#: The four body measurements of palmerpenguins used as features (``year`` is not a property of the bird).
PENGUIN_FEATURES = ("bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g")


def penguins(
    batch_size: int = 32,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    limit_train: Optional[int] = None,
    limit_test: Optional[int] = None,
    normalize: str = "standardize",
) -> Splits:
    """Palmer penguins: 4 standardised body measurements -> species (Adelie, Chinstrap, Gentoo).

    Rows with a missing measurement are dropped (342 of 344 remain).
    """
    from palmerpenguins import load_penguins

    df = load_penguins()[[*PENGUIN_FEATURES, "species"]].dropna()
    species = tuple(sorted(df["species"].unique()))
    x = torch.as_tensor(df[list(PENGUIN_FEATURES)].to_numpy(dtype=np.float64), dtype=torch.float64)
    y = torch.as_tensor(np.array(df["species"].map({s: i for i, s in enumerate(species)}), dtype=np.int64))
    held_out = int(round(test_fraction * x.shape[0]))
    train_x, train_y, test_x, test_y = _split_one(x, y, held_out, split_seed)
    return _finish("penguins", train_x, train_y, test_x, test_y, len(species), batch_size, species,
                   limit_train, limit_test, normalize)
