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
  ``split_seed`` keeps ``N`` examples held out and trains on the rest (``split_seed: null``: a plain split in
  file order, the last ``N`` held out). This is how the MNIST test set shipped
  beside the project (``../shared/data/mnist``, test files only) gives real digits offline.
* ``cifar10``, ``svhn``: the files of torchvision's ``CIFAR10`` (``<root>/cifar-10-batches-py/``, python pickle
  batches) and ``SVHN`` (``<root>/{train,test}_32x32.mat``), downloaded by torchvision when missing and online,
  checked against their published MD5 sums (``check_md5``), decoded here (:func:`read_cifar_batch`,
  :func:`read_svhn_mat`; SVHN's label 10 is the digit 0).
* ``digits`` (scikit-learn's 8x8 digits, as 1x8x8 images) and ``penguins`` (palmerpenguins): shipped with
  their packages, hence always available offline; split by a fixed permutation seeded by ``split_seed``.

Normalisation (``normalize``, every factory): ``standardize`` (the default) standardises each input channel
(images) or feature (tabular) with the mean and standard deviation of the *training* split, so nothing about
the held-out data leaks into training; ``none`` keeps the source's own scale: pixels in [0, 1] (what
torchvision's ``ToTensor`` gives, and what the reference implementation orobix/fwdgrad trains on), tabular
features raw.
"""

from __future__ import annotations

import getpass
import gzip
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Tuple, Type

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
    "unreadable",
    "mnist",
    "fashion_mnist",
    "kmnist",
    "cifar10",
    "svhn",
    "read_cifar_batch",
    "read_svhn_mat",
    "digits",
    "penguins",
]

log = logging.getLogger(__name__)

#: Relative ``dataset.root`` values are taken relative to the project root (the folder of ``mnist_fwdgrad.py``),
#: so ``root: data`` means ``<project>/data`` whatever the current directory.
PROJECT_ROOT = next(p for p in Path(__file__).resolve().parents if (p / "fwdgrad" / "__init__.py").is_file())
OFFLINE_ALTERNATIVES = "dataset=digits or dataset=penguins"
#: Values of every factory's ``normalize`` argument (``dataset.normalize``): see the module docstring.
NORMALIZATIONS = ("standardize", "none", "mnist")
#: ``normalize: mnist``: torchvision's MNIST constants (mean and std of the 60,000 training images' pixels in
#: [0, 1]), as ``transforms.Normalize((0.1307,), (0.3081,))`` in the reference implementations' loaders.
MNIST_MEAN_STD = (0.1307, 0.3081)


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

    def __post_init__(self) -> None:
        # Labels index the model's outputs: one out of range would fail deep in the loss (or, on a GPU, as a
        # device-side assert), far from its cause.
        for part, x, y in (("training", self.train_x, self.train_y), ("held-out", self.test_x, self.test_y)):
            if y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
                raise DatasetError(f"dataset {self.name!r}: the {part} labels must be one integer per example "
                                   f"({x.shape[0]}), got a {y.dtype} tensor of shape {tuple(y.shape)}.")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                bad = y[(y < 0) | (y >= self.num_classes)]
                raise DatasetError(
                    f"dataset {self.name!r}: {bad.numel()} {part} label(s) outside 0..{self.num_classes - 1} (e.g. "
                    f"{int(bad[0])}) for num_classes={self.num_classes}. The label file is damaged or belongs to "
                    "another dataset, or the dataset factory's num_classes is wrong."
                )

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


def unreadable(path: str | os.PathLike, err: OSError) -> DatasetError:
    """The error for a data file or folder this process may not read: its data is fine, its permissions are not
    (never "damaged; delete it", which could cost good data)."""
    return DatasetError(
        f"{path} cannot be read: {err.strerror or 'permission denied'} for the user this process runs as "
        f"({getpass.getuser()}): a permission problem, not damaged data. Make it readable (chmod a+r on the files and a+rx on "
        "their folders, or ask their owner), or point dataset.root at a readable copy."
    )


def _apply_limit(x: Tensor, y: Tensor, limit: Optional[int], key: str) -> Tuple[Tensor, Tensor]:
    """The first ``limit`` examples (all for None); a limit that is not a positive integer is refused (``x[:-5]``
    would silently drop the last five instead)."""
    if limit is None:
        return x, y
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"dataset.{key} must be a positive integer (use only the first N examples) or null "
                          f"(all of them), got {limit!r}.")
    return x[:limit], y[:limit]


def _seeded_permutation(n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=g)


def _normalise(train_x: Tensor, test_x: Tensor, how: str
               ) -> Tuple[Tensor, Tensor, Tuple[float, ...], Tuple[float, ...]]:
    """Scale the inputs as ``how`` (:data:`NORMALIZATIONS`) says; return them with the per-channel
    ``(mean, std)`` that maps them back, ``x_source = x * std + mean``.

    ``standardize``: per channel (dim 1) with statistics of the training split only. ``none``: unchanged
    (``mean = 0``, ``std = 1``, so the plots' inverse is the identity). ``mnist``: every channel with the fixed
    :data:`MNIST_MEAN_STD`, whatever the split.
    """
    if how not in NORMALIZATIONS:
        raise ConfigError(
            f"unknown dataset.normalize {how!r}; allowed: {', '.join(NORMALIZATIONS)} (standardize: per "
            "channel with the training split's statistics; none: the source's own scale, e.g. pixels in "
            "[0, 1]; mnist: the fixed constants (0.1307, 0.3081) of torchvision's MNIST examples)."
        )
    dims = [d for d in range(train_x.dim()) if d != 1]
    if how == "standardize":
        mean = train_x.mean(dim=dims, keepdim=True)
        std = train_x.std(dim=dims, keepdim=True).clamp_min(1e-8)
    else:  # none, mnist: fixed constants
        shape = [1 if d in dims else train_x.shape[d] for d in range(train_x.dim())]
        m, sd = MNIST_MEAN_STD if how == "mnist" else (0.0, 1.0)
        mean, std = torch.full(shape, m, dtype=train_x.dtype), torch.full(shape, sd, dtype=train_x.dtype)
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
    train_x, train_y = _apply_limit(train_x, train_y, limit_train, "limit_train")
    test_x, test_y = _apply_limit(test_x, test_y, limit_test, "limit_test")
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


def _split_one(x: Tensor, y: Tensor, held_out: int, seed: Optional[int]
               ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Split one pool into (train, held-out) by a fixed permutation seeded by ``seed``; ``seed=None``: a plain
    split in file order, the first ``n - held_out`` for training and the last ``held_out`` held out."""
    n = x.shape[0]
    if not 0 < held_out < n:
        raise DatasetError(
            f"cannot hold out {held_out} of {n} examples; choose a number between 1 and {n - 1}."
        )
    if seed is None:
        return x[: n - held_out], y[: n - held_out], x[n - held_out:], y[n - held_out:]
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
    except PermissionError as e:
        raise unreadable(path, e) from None
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
        try:
            if (raw_dir / name).is_file():
                return raw_dir / name
        except PermissionError as e:  # a folder on the way may not be searched
            raise unreadable(raw_dir, e) from None
    return None


def _idx_dataset(
    cls: Type,
    name: str,
    root: str,
    batch_size: int,
    download: bool,
    test_set_split: Optional[int],
    split_seed: Optional[int],
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
    split_seed: Optional[int] = 0,
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
    split_seed: Optional[int] = 0,
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
    split_seed: Optional[int] = 0,
    limit_train: Optional[int] = None,
    limit_test: Optional[int] = None,
    normalize: str = "standardize",
) -> Splits:
    """Kuzushiji-MNIST cursive Japanese characters, 1x28x28, 10 classes (60,000 / 10,000)."""
    from torchvision.datasets import KMNIST

    return _idx_dataset(KMNIST, "kmnist", root, batch_size, download, test_set_split, split_seed, limit_train,
                        limit_test, normalize)


# --------------------------------------------------------------------------------------------------------
# CIFAR-10 and SVHN: torchvision downloads them, fwdgrad decodes its file formats into tensors
# --------------------------------------------------------------------------------------------------------
def _fetch_missing(name: str, absent: Callable[[], list[str]], download: bool, fetch: Callable[[], None],
                   folder: Path, layout: str) -> None:
    """Download with torchvision's own downloader if files are ``absent()`` and ``download`` is on; raise the
    offline message (as for MNIST) if any are still missing."""
    if absent() and download:
        log.info("downloading %s into %s", name, folder)
        try:
            fetch()
        except Exception as e:  # offline: URLError, OSError, RuntimeError
            log.debug("download of %s failed: %r", name, e)
    missing = absent()
    if missing:
        how = "download was disabled (dataset.download=false)" if not download else "downloading them failed (offline?)"
        raise DatasetNotFoundError(
            f"{name} files not found in {folder}: missing {', '.join(missing)}, and {how}. Put {layout} there, "
            f"point dataset.root at the folder holding them, or run offline with {OFFLINE_ALTERNATIVES} "
            "(shipped with their Python packages)."
        )


def _check_md5(files: Sequence[Tuple[Path, str]], check: bool) -> None:
    """Compare each file's MD5 with the published one (``check_md5=false`` accepts other files in the format)."""
    if not check:
        return
    from torchvision.datasets.utils import check_integrity

    for path, md5 in files:
        if not check_integrity(str(path), md5):
            raise CorruptDatasetError(
                f"{path} is damaged or not the published file (MD5 differs from {md5}); delete it and download "
                "it again (dataset.download=true), set dataset.check_md5=false for your own files in this format, "
                f"or use the offline datasets: {OFFLINE_ALTERNATIVES}."
            )


def _corrupt(path: Path, why: str) -> CorruptDatasetError:
    return CorruptDatasetError(
        f"cannot decode {path} ({why}); the file is damaged: delete it and download it again "
        f"(dataset.download=true), or use the offline datasets: {OFFLINE_ALTERNATIVES}."
    )


def read_cifar_batch(path: Path) -> Tuple[Tensor, Tensor]:
    """Decode one CIFAR-10 python batch (a pickled dict: ``data`` uint8 ``(N, 3072)`` rows of 1024 red, 1024
    green, 1024 blue pixels in row-major order; ``labels``, N ints in 0..9) into ``(N, 3, 32, 32)`` uint8 images
    and int64 labels. A damaged file raises :class:`CorruptDatasetError` naming it."""
    import pickle

    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")  # the batches were pickled by Python 2
        data, labels = np.asarray(entry["data"]), np.asarray(entry["labels"], dtype=np.int64)
    except Exception as e:  # a damaged pickle can fail in many ways (EOFError, UnpicklingError, IndexError...)
        raise _corrupt(path, repr(e)) from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
        raise _corrupt(path, f"data {data.dtype} {data.shape} with {labels.shape[0]} labels, expected uint8 (N, 3072) "
                             "and N labels")
    if labels.size and not 0 <= labels.min() <= labels.max() <= 9:
        raise _corrupt(path, f"labels outside 0..9 ({labels.min()}..{labels.max()})")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def cifar10(
    root: str = "data",
    batch_size: int = 64,
    download: bool = True,
    limit_train: Optional[int] = None,
    limit_test: Optional[int] = None,
    check_md5: bool = True,
    normalize: str = "standardize",
) -> Splits:
    """CIFAR-10 colour images, 3x32x32, 10 classes (50,000 / 10,000), from ``<root>/cifar-10-batches-py/``
    (torchvision's layout and downloader; the python pickle batches decoded here)."""
    import pickle

    from torchvision.datasets import CIFAR10

    root_dir = _resolve_root(root)
    folder = root_dir / CIFAR10.base_folder
    published = [(f, md5) for f, md5 in CIFAR10.train_list + CIFAR10.test_list]
    published.append((CIFAR10.meta["filename"], CIFAR10.meta["md5"]))
    _fetch_missing("cifar10", lambda: [f for f, _ in published if not (folder / f).is_file()], download,
                   lambda: CIFAR10(str(root_dir), train=True, download=True), folder,
                   "the extracted cifar-10-python.tar.gz")
    _check_md5([(folder / f, md5) for f, md5 in published], check_md5)
    parts = [read_cifar_batch(folder / f) for f, _ in CIFAR10.train_list]
    train_x, train_y = torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])
    test_x, test_y = read_cifar_batch(folder / CIFAR10.test_list[0][0])
    meta = folder / CIFAR10.meta["filename"]
    try:
        with open(meta, "rb") as f:
            classes = list(pickle.load(f, encoding="latin1")[CIFAR10.meta["key"]])
    except Exception as e:  # as in read_cifar_batch
        raise _corrupt(meta, repr(e)) from None
    return _finish("cifar10", train_x.float().div_(255.0), train_y, test_x.float().div_(255.0), test_y, 10,
                   batch_size, classes, limit_train, limit_test, normalize)


def read_svhn_mat(path: Path) -> Tuple[Tensor, Tensor]:
    """Decode one SVHN ``*_32x32.mat`` file (MATLAB v5: ``X`` uint8 ``(32, 32, 3, N)``, ``y`` ``(N, 1)`` labels
    1..10, where 10 stands for the digit 0) into ``(N, 3, 32, 32)`` uint8 images and int64 digit labels 0..9,
    as torchvision's ``SVHN`` reads them. A damaged file raises :class:`CorruptDatasetError` naming it."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path))
        x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).astype(np.int64).reshape(-1)
    except Exception as e:  # scipy fails on a damaged file in many ways (MatReadError, IndexError, ValueError...)
        raise _corrupt(path, repr(e)) from None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.shape != (x.shape[3],):
        raise _corrupt(path, f"X {x.dtype} {x.shape} with {y.shape[0]} labels, expected uint8 (32, 32, 3, N) and N")
    if y.size and not 1 <= y.min() <= y.max() <= 10:
        raise _corrupt(path, f"labels outside 1..10 ({y.min()}..{y.max()})")
    y[y == 10] = 0  # the digit 0 is labelled 10 in the .mat files
    return torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1))), torch.from_numpy(y)


def svhn(
    root: str = "data",
    batch_size: int = 64,
    download: bool = True,
    limit_train: Optional[int] = None,
    limit_test: Optional[int] = None,
    check_md5: bool = True,
    normalize: str = "standardize",
) -> Splits:
    """SVHN house-number digits, 3x32x32, 10 classes (73,257 train / 26,032 test; the 531,131 "extra" images
    are not used), from ``<root>/train_32x32.mat`` and ``<root>/test_32x32.mat`` (torchvision's layout and
    downloader; the .mat files decoded here)."""
    from torchvision.datasets import SVHN

    root_dir = _resolve_root(root)
    splits = {s: SVHN.split_list[s] for s in ("train", "test")}

    def fetch() -> None:
        for s in splits:
            if not (root_dir / splits[s][1]).is_file():
                SVHN(str(root_dir), split=s, download=True)

    _fetch_missing("svhn", lambda: [f for _, f, _ in splits.values() if not (root_dir / f).is_file()], download,
                   fetch, root_dir, "train_32x32.mat and test_32x32.mat from ufldl.stanford.edu/housenumbers")
    _check_md5([(root_dir / f, md5) for _, f, md5 in splits.values()], check_md5)
    train_x, train_y = read_svhn_mat(root_dir / splits["train"][1])
    test_x, test_y = read_svhn_mat(root_dir / splits["test"][1])
    return _finish("svhn", train_x.float().div_(255.0), train_y, test_x.float().div_(255.0), test_y, 10, batch_size,
                   [str(d) for d in range(10)], limit_train, limit_test, normalize)


# --------------------------------------------------------------------------------------------------------
# Offline datasets shipped with their packages
# --------------------------------------------------------------------------------------------------------
def digits(
    batch_size: int = 64,
    test_fraction: float = 0.2,
    split_seed: Optional[int] = 0,
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
    split_seed: Optional[int] = 0,
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
