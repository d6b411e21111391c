"""Datasets for the chapters and the training command, as NumPy arrays.

Images are float32 in ``[0, 1]``, layout NHWC ``(n, height, width, channels)``; labels are int64.
``load(name)`` returns an :class:`ImageDataset`. The names (:data:`DATASETS`):

- ``"digits"``: scikit-learn's 8x8 handwritten digits (ships with scikit-learn, nothing to
  download), the same split as :func:`digits`.
- ``"synthetic-cifar10"``, ``"synthetic-cifar100"``: generated from ``seed`` (nothing to
  download), CIFAR's shapes (50000/10000 images of 32x32x3, 10 or 100 classes). Each class has a
  random 8x8 colour pattern; an image is its class pattern, tiled 4x4 times at low contrast, plus
  strong uniform pixel noise (learnable, but a small CNN needs a few epochs).
- ``"cifar10"``, ``"cifar100"``: the official python-version tarballs from
  https://www.cs.toronto.edu/~kriz/cifar.html (CIFAR-100 with its 100 fine labels).
- ``"fashion-mnist"``: the official idx files from
  https://github.com/zalandoresearch/fashion-mnist, 28x28x1.

Downloads are cached in ``data_dir()/<name>/``: the directory named by the environment variable
``SAM_EDU_DATA`` if set, else ``~/.cache/sam_edu``. Every file is checked against its official md5
before use, also when it comes from the cache. Offline, download the file on another machine and
put it at the path the error message names (for example ``~/.cache/sam_edu/cifar10/
cifar-10-python.tar.gz``); ``load(..., download=False)`` uses only the cache and never the network.

Default augmentation (:func:`augment`, fields ``crop_padding`` and ``flip``): pad by 4 and crop,
plus horizontal flips, for the 32x32 datasets; pad by 2 and flip for Fashion-MNIST (clothes are
centred and fill most of the 28x28 frame, so shifts stay small; a mirrored garment is still the
same garment); pad by 1 without flips for digits (a mirrored digit is not a digit).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import pathlib
import pickle
import tarfile
import tempfile
import urllib.request
from collections.abc import Iterator

import numpy as np
from tqdm import tqdm

DATA_ENV = "SAM_EDU_DATA"


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """Where a dataset file comes from and the md5 checksum of the official file."""

    url: str
    md5: str


# One table per dataset: file name in the cache -> official URL and md5.
CIFAR10_FILES = {
    "cifar-10-python.tar.gz": RemoteFile(
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a"),
}
CIFAR100_FILES = {
    "cifar-100-python.tar.gz": RemoteFile(
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85"),
}
_FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_FILES = {
    "train-images-idx3-ubyte.gz": RemoteFile(
        _FASHION_MNIST_URL + "train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    "train-labels-idx1-ubyte.gz": RemoteFile(
        _FASHION_MNIST_URL + "train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
    "t10k-images-idx3-ubyte.gz": RemoteFile(
        _FASHION_MNIST_URL + "t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
    "t10k-labels-idx1-ubyte.gz": RemoteFile(
        _FASHION_MNIST_URL + "t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
}


@dataclasses.dataclass(frozen=True)
class _Spec:
    num_classes: int
    num_train: int  # full size of the training split
    num_test: int
    crop_padding: int
    flip: bool


_SPECS = {
    "digits": _Spec(10, 1257, 540, crop_padding=1, flip=False),
    "synthetic-cifar10": _Spec(10, 50000, 10000, crop_padding=4, flip=True),
    "synthetic-cifar100": _Spec(100, 50000, 10000, crop_padding=4, flip=True),
    "cifar10": _Spec(10, 50000, 10000, crop_padding=4, flip=True),
    "cifar100": _Spec(100, 50000, 10000, crop_padding=4, flip=True),
    "fashion-mnist": _Spec(10, 60000, 10000, crop_padding=2, flip=True),
}
DATASETS = tuple(_SPECS)


@dataclasses.dataclass(frozen=True, eq=False)
class ImageDataset:
    """A train/test split of images with the defaults to standardize and augment them.

    ``x_*`` are float32 NHWC arrays in ``[0, 1]``, ``y_*`` int64 labels. ``mean`` and ``std`` are
    the per-channel statistics of ``x_train`` (for :func:`standardize`); ``crop_padding`` and
    ``flip`` are this dataset's default arguments of :func:`augment`.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int
    flip: bool

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(height, width, channels)`` of one image."""
        return tuple(self.x_train.shape[1:])


def data_dir() -> pathlib.Path:
    """The cache directory: ``$SAM_EDU_DATA`` if set, else ``~/.cache/sam_edu``."""
    path = os.environ.get(DATA_ENV)
    return pathlib.Path(path).expanduser() if path else pathlib.Path.home() / ".cache" / "sam_edu"


def digits(test_size: float = 0.3, seed: int = 0, label_noise: float = 0.0):
    """8x8 digits scaled to [0, 1], split stratified into ``(x_train, y_train, x_test, y_test)``.

    ``label_noise`` is the fraction of *training* labels replaced by a uniformly random class
    (drawn with ``seed``; the replacement may equal the true label). Test labels stay clean.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
    data = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(data.data / 16.0, data.target, test_size=test_size,
                                              random_state=0, stratify=data.target)
    y_tr = add_label_noise(y_tr, label_noise, 10, np.random.default_rng(seed))
    return x_tr, y_tr, x_te, y_te


def load(name: str, *, root=None, download: bool = True, label_noise: float = 0.0,
         seed: int = 0, num_train: int | None = None, num_test: int | None = None) -> ImageDataset:
    """Load dataset ``name`` (one of :data:`DATASETS`) as an :class:`ImageDataset`.

    ``root`` is the cache directory (default :func:`data_dir`); with ``download=False`` only files
    already there are used. ``label_noise`` is the fraction of *training* labels replaced by a
    uniformly random class drawn with ``seed`` (the replacement may equal the true label, as in
    :func:`digits`); test labels stay clean. ``seed`` also generates the synthetic datasets.
    ``num_train``/``num_test`` keep only the first images of each split (for quick runs).

    Raises ``ValueError`` for an unknown name or a bad argument, ``FileNotFoundError`` when a file
    is missing and ``download=False``, ``ConnectionError`` when a download fails (both name the
    URL and where to put the file by hand) and ``ValueError`` when a file's md5 is wrong.
    """
    if name not in _SPECS:
        raise ValueError(f"unknown dataset {name!r}; the names are {', '.join(DATASETS)}")
    spec = _SPECS[name]
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
    num_train = _check_size("num_train", num_train, spec.num_train, minimum=1)
    num_test = _check_size("num_test", num_test, spec.num_test, minimum=0)
    root = data_dir() if root is None else pathlib.Path(root).expanduser()

    if name == "digits":
        x_train, y_train, x_test, y_test = _read_digits()
    elif name.startswith("synthetic-"):
        templates = _synthetic_templates(spec.num_classes, seed)
        x_train, y_train = _synthetic_split(templates, seed, 1, num_train)
        x_test, y_test = _synthetic_split(templates, seed, 2, num_test)
    elif name == "cifar10":
        x_train, y_train, x_test, y_test = _read_cifar(
            _fetch(name, CIFAR10_FILES, root, download), "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)], "test_batch", b"labels")
    elif name == "cifar100":
        x_train, y_train, x_test, y_test = _read_cifar(
            _fetch(name, CIFAR100_FILES, root, download), "cifar-100-python",
            ["train"], "test", b"fine_labels")
    else:
        x_train, y_train, x_test, y_test = _read_fashion_mnist(
            _fetch(name, FASHION_MNIST_FILES, root, download))

    x_train, y_train = x_train[:num_train], y_train[:num_train]
    x_test, y_test = x_test[:num_test], y_test[:num_test]
    y_train = add_label_noise(y_train, label_noise, spec.num_classes, np.random.default_rng(seed))
    mean, std = _channel_stats(x_train)
    return ImageDataset(name, x_train, y_train, x_test, y_test, spec.num_classes, mean, std,
                        spec.crop_padding, spec.flip)


def augment(x: np.ndarray, rng: np.random.Generator, crop_padding: int, flip: bool) -> np.ndarray:
    """The standard augmentation of a batch ``x`` (NHWC): zero-pad each side by ``crop_padding``,
    crop a random ``height x width`` window back out, and mirror left-right with probability 1/2
    if ``flip``. Every image gets its own crop and flip, drawn from ``rng``; ``x`` is not changed.
    """
    if not isinstance(crop_padding, (int, np.integer)) or crop_padding < 0:
        raise ValueError(f"crop_padding must be an integer >= 0, got {crop_padding!r}")
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"x must be a batch of images (n, height, width, channels), "
                         f"got shape {x.shape}")
    n, height, width, _ = x.shape
    if crop_padding > 0:
        p = crop_padding
        padded = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
        top, left = rng.integers(0, 2 * p + 1, size=(2, n))
        rows = top[:, None, None] + np.arange(height)[None, :, None]  # (n, height, 1)
        cols = left[:, None, None] + np.arange(width)[None, None, :]  # (n, 1, width)
        # One gather for the whole batch: out[i, r, c] = padded[i, top[i] + r, left[i] + c].
        out = padded[np.arange(n)[:, None, None], rows, cols]
    else:
        out = x.copy()
    if flip:
        mirrored = rng.random(n) < 0.5
        out[mirrored] = out[mirrored, :, ::-1]
    return out


def standardize(x: np.ndarray, mean, std) -> np.ndarray:
    """``(x - mean) / std`` per channel (the last axis), as float32."""
    mean = np.asarray(mean, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)
    if mean.shape != (np.shape(x)[-1],) or std.shape != mean.shape:
        raise ValueError(f"mean and std need one value per channel ({np.shape(x)[-1]}), "
                         f"got {mean.shape} and {std.shape}")
    if np.any(std <= 0):
        raise ValueError(f"std must be positive, got {std.tolist()}")
    return ((np.asarray(x, dtype=np.float32) - mean) / std).astype(np.float32, copy=False)


def add_label_noise(y: np.ndarray, fraction: float, num_classes: int,
                    rng: np.random.Generator) -> np.ndarray:
    """A copy of the labels ``y`` with each one, with probability ``fraction``, replaced by a
    uniformly random class in ``[0, num_classes)`` (which may equal the true label, so about
    ``fraction * (1 - 1 / num_classes)`` of the labels end up wrong)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    y = np.array(y, dtype=np.int64)
    redraw = rng.random(len(y)) < fraction
    y[redraw] = rng.integers(0, num_classes, int(redraw.sum()))
    return y


def batches(n: int, batch_size: int, rng: np.random.Generator,
            drop_last: bool = False) -> Iterator[np.ndarray]:
    """Index arrays for one epoch over ``n`` examples in a random order from ``rng``: every index
    once, in batches of ``batch_size`` (the last one smaller, or dropped if ``drop_last``)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = rng.permutation(n)
    stop = n - n % batch_size if drop_last else n
    return (order[start:start + batch_size] for start in range(0, stop, batch_size))


# --- helpers ---------------------------------------------------------------------------------

def _check_size(argument: str, value: int | None, size: int, minimum: int) -> int:
    """``value`` (``None`` = the whole split of ``size`` images) checked to lie in [minimum, size]."""
    if value is None:
        return size
    if not isinstance(value, (int, np.integer)) or not minimum <= value <= size:
        raise ValueError(f"{argument} must be an integer in [{minimum}, {size}], got {value!r}")
    return int(value)


def _channel_stats(x: np.ndarray, chunk: int = 1024) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of ``x`` (NHWC), summed in float64 a chunk of
    images at a time, so that no full-size temporary array is made."""
    channels = x.shape[-1]
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    for start in range(0, len(x), chunk):
        pixels = x[start:start + chunk].reshape(-1, channels).astype(np.float64)
        total += pixels.sum(axis=0)
        total_sq += np.einsum("ij,ij->j", pixels, pixels)
    count = x.size // channels
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return tuple(mean.tolist()), tuple(std.tolist())


def _read_digits():
    """The split of :func:`digits` as 8x8x1 float32 images."""
    x_train, y_train, x_test, y_test = digits()

    def images(x):
        return x.reshape(-1, 8, 8, 1).astype(np.float32)
    return images(x_train), y_train.astype(np.int64), images(x_test), y_test.astype(np.int64)


# Synthetic CIFAR: each class has a random 8x8x3 pattern, repeated 4x4 times over the 32x32 image
# at low contrast and buried in pixel noise. The signal is local and repeats, as an object's
# texture does, so a convolutional network can pick it up anywhere in the image.
_PERIOD = 8
_CONTRAST = 0.25  # pixel = 0.5 + _CONTRAST * (pattern - 0.5) + noise
_NOISE = 1.0     # width of the uniform pixel noise, centred on 0
_CHUNK = 2500    # images generated per random stream


def _synthetic_templates(num_classes: int, seed: int) -> np.ndarray:
    """One random ``_PERIOD x _PERIOD x 3`` pattern per class, values in [0, 1]."""
    rng = np.random.default_rng([seed, 0])
    return rng.random((num_classes, _PERIOD, _PERIOD, 3), dtype=np.float32)


def _synthetic_split(templates: np.ndarray, seed: int, split: int, n: int):
    """``n`` images and labels of one split (1 = train, 2 = test), made in chunks of ``_CHUNK``,
    each from its own random stream, so the first ``n`` images do not depend on the total."""
    x = np.empty((n, 32, 32, templates.shape[-1]), dtype=np.float32)
    y = np.empty(n, dtype=np.int64)
    for index, start in enumerate(range(0, n, _CHUNK)):
        images, labels = _synthetic_chunk(templates, np.random.default_rng([seed, split, index]))
        stop = min(start + _CHUNK, n)
        x[start:stop] = images[:stop - start]
        y[start:stop] = labels[:stop - start]
    return x, y


def _synthetic_chunk(templates: np.ndarray, rng: np.random.Generator):
    """``_CHUNK`` random labels and their images: noise plus the class pattern on every tile."""
    num_classes, period, _, channels = templates.shape
    tiles = 32 // period
    labels = rng.integers(0, num_classes, _CHUNK)
    images = rng.random((_CHUNK, 32, 32, channels), dtype=np.float32)
    images -= 0.5  # in place, so that there is one chunk-sized array only
    images *= _NOISE
    pattern = 0.5 + _CONTRAST * (templates[labels] - 0.5)  # (_CHUNK, period, period, channels)
    # Add the pattern to every period x period tile, by broadcasting over the tile indices.
    images.reshape(_CHUNK, tiles, period, tiles, period, channels)[:] += \
        pattern[:, None, :, None, :, :]
    np.clip(images, 0.0, 1.0, out=images)
    return images, labels


def _fetch(dataset: str, files: dict[str, RemoteFile], root: pathlib.Path,
           download: bool) -> dict[str, pathlib.Path]:
    """The verified local paths of ``files``, downloaded into ``root/dataset/`` if missing."""
    paths = {}
    for filename, remote in files.items():
        path = root / dataset / filename
        if not path.exists():
            if not download:
                raise FileNotFoundError(
                    f"{path} is not in the cache and download=False (only the cache is used). "
                    f"Download {remote.url} and put the file at {path}, or pass download=True.")
            _download(remote.url, path)
        _check_md5(path, remote.md5)
        paths[filename] = path
    return paths


def _download(url: str, path: pathlib.Path) -> None:
    """Download ``url`` to ``path``: into a temporary file next to it, renamed when complete, so
    that an interrupted download never leaves a partial file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            length = response.headers.get("Content-Length")
            with tqdm(total=int(length) if length else None, unit="B", unit_scale=True,
                      desc=path.name, disable=length is None) as progress:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    progress.update(len(chunk))
    except OSError as error:  # urllib.error.URLError (no network, bad URL) is an OSError too
        raise ConnectionError(
            f"could not download {url} ({getattr(error, 'reason', error)}). If this machine is "
            f"offline, download the file elsewhere and put it at {path}; "
            f"load(..., download=False) then uses only the cache.") from error
    else:
        os.replace(tmp_name, path)
    finally:
        pathlib.Path(tmp_name).unlink(missing_ok=True)


def _check_md5(path: pathlib.Path, expected: str) -> None:
    """Raise ``ValueError`` unless the md5 of the file at ``path`` is ``expected``."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise ValueError(
            f"{path} has md5 {digest.hexdigest()}, expected {expected}: the file is corrupt or "
            f"incomplete. Delete it and load again to download it afresh.")


def _to_float_images(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [0, 1] (in place after one conversion copy)."""
    x = pixels.astype(np.float32)
    x /= 255.0
    return x


def _read_cifar(paths: dict[str, pathlib.Path], folder: str, train_members: list[str],
                test_member: str, label_key: bytes):
    """Images and labels from a CIFAR python tarball. Only the named members are read (into
    memory, nothing is extracted to disk); unpickling is safe because the md5 was checked."""
    (path,) = paths.values()

    def read(tar, member):
        with tar.extractfile(f"{folder}/{member}") as f:
            batch = pickle.load(f, encoding="bytes")
        # Each row is one image: 1024 red, then 1024 green, then 1024 blue values, row-major.
        pixels = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        return pixels.transpose(0, 2, 3, 1), np.asarray(batch[label_key], dtype=np.int64)

    with tarfile.open(path, "r:gz") as tar:
        train = [read(tar, member) for member in train_members]
        x_test, y_test = read(tar, test_member)
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return _to_float_images(x_train), y_train, _to_float_images(x_test), y_test


def _read_idx(path: pathlib.Path, magic: int) -> np.ndarray:
    """An array from a gzipped idx file: big-endian int32 magic (2051 images, 2049 labels),
    one big-endian int32 per dimension, then the uint8 values."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: idx magic number {found}, expected {magic}")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _read_fashion_mnist(paths: dict[str, pathlib.Path]):
    """28x28x1 images and labels from the four Fashion-MNIST idx files."""
    def images(name):
        return _to_float_images(_read_idx(paths[name], 2051)[..., None])

    def labels(name):
        return _read_idx(paths[name], 2049).astype(np.int64)

    return (images("train-images-idx3-ubyte.gz"), labels("train-labels-idx1-ubyte.gz"),
            images("t10k-images-idx3-ubyte.gz"), labels("t10k-labels-idx1-ubyte.gz"))
