"""sam_edu.data: the dataset loaders, run on small archives written here in the official formats
(the real download path runs through urllib on file:// URLs), and the array utilities."""

import gzip
import hashlib
import io
import pickle
import tarfile
import urllib.error

import numpy as np
import pytest

from sam_edu import data


# --- small archives in the official formats ------------------------------------------------

def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def _add_pickle(tar, name, obj):
    payload = pickle.dumps(obj, protocol=2)
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _write_cifar10(path, rng):
    """cifar-10-python.tar.gz with 5 training batches of 2 images and a test batch of 3."""
    batches = {f"data_batch_{i}": 2 for i in range(1, 6)} | {"test_batch": 3}
    rows, labels = {}, {}
    with tarfile.open(path, "w:gz") as tar:
        for member, n in batches.items():
            rows[member] = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            labels[member] = rng.integers(0, 10, n).tolist()
            _add_pickle(tar, f"cifar-10-batches-py/{member}", {
                b"batch_label": member.encode(), b"labels": labels[member],
                b"data": rows[member], b"filenames": [b"img.png"] * n})
        _add_pickle(tar, "cifar-10-batches-py/batches.meta", {
            b"num_cases_per_batch": 2, b"label_names": [b"class"] * 10, b"num_vis": 3072})
    train = [f"data_batch_{i}" for i in range(1, 6)]
    return (np.concatenate([rows[m] for m in train]), sum((labels[m] for m in train), []),
            rows["test_batch"], labels["test_batch"])


def _write_cifar100(path, rng):
    """cifar-100-python.tar.gz with 4 training and 2 test images; coarse labels differ from fine."""
    out = []
    with tarfile.open(path, "w:gz") as tar:
        for member, n in (("train", 4), ("test", 2)):
            rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            fine = rng.integers(20, 100, n).tolist()
            _add_pickle(tar, f"cifar-100-python/{member}", {
                b"filenames": [b"img.png"] * n, b"batch_label": member.encode(),
                b"fine_labels": fine, b"coarse_labels": [0] * n, b"data": rows})
            out += [rows, fine]
        _add_pickle(tar, "cifar-100-python/meta", {
            b"fine_label_names": [b"f"] * 100, b"coarse_label_names": [b"c"] * 20})
    return out


def _write_idx(path, array, magic):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _write_fashion_mnist(folder, rng):
    arrays = {"train-images-idx3-ubyte.gz": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
              "train-labels-idx1-ubyte.gz": rng.integers(0, 10, 5, dtype=np.uint8),
              "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
              "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, 3, dtype=np.uint8)}
    for name, array in arrays.items():
        _write_idx(folder / name, array, 2051 if array.ndim == 3 else 2049)
    return arrays


def _serve(monkeypatch, table_name, folder, names):
    """Point the dataset's URL/md5 table at the files in ``folder`` (file:// URLs)."""
    table = {name: data.RemoteFile((folder / name).as_uri(), _md5(folder / name)) for name in names}
    monkeypatch.setattr(data, table_name, table)
    return table


def _hwc(rows):
    """CIFAR rows (n, 3072: all red, all green, all blue, each 32x32 row-major) as NHWC."""
    planes = [rows[:, c * 1024:(c + 1) * 1024].reshape(-1, 32, 32) for c in range(3)]
    return np.stack(planes, axis=-1)


@pytest.fixture
def cifar10(tmp_path, monkeypatch):
    source = tmp_path / "source"
    source.mkdir()
    written = _write_cifar10(source / "cifar-10-python.tar.gz", np.random.default_rng(0))
    table = _serve(monkeypatch, "CIFAR10_FILES", source, ["cifar-10-python.tar.gz"])
    return written, table["cifar-10-python.tar.gz"], tmp_path / "cache"


# --- the official tables --------------------------------------------------------------------

def test_official_urls_and_checksums():
    kriz = "https://www.cs.toronto.edu/~kriz/"
    assert data.CIFAR10_FILES == {"cifar-10-python.tar.gz": data.RemoteFile(
        kriz + "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")}
    assert data.CIFAR100_FILES == {"cifar-100-python.tar.gz": data.RemoteFile(
        kriz + "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85")}
    fashion = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
    md5s = {"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"}
    assert data.FASHION_MNIST_FILES == {
        name: data.RemoteFile(fashion + name, md5) for name, md5 in md5s.items()}
    assert data.DATASETS == ("digits", "synthetic-cifar10", "synthetic-cifar100", "cifar10",
                             "cifar100", "fashion-mnist")


# --- download, cache, checksums, errors -----------------------------------------------------

def test_cifar10_is_downloaded_verified_and_decoded(cifar10):
    (x_train, y_train, x_test, y_test), _, cache = cifar10
    ds = data.load("cifar10", root=cache)
    assert sorted(p.name for p in (cache / "cifar10").iterdir()) == ["cifar-10-python.tar.gz"]
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.input_shape == (32, 32, 3) and ds.num_classes == 10
    assert (ds.crop_padding, ds.flip) == (4, True)
    # Pixel (row r, column c, channel k) of image i is entry k*1024 + r*32 + c of row i.
    assert ds.x_train[3, 5, 7, 2] == x_train[3, 2 * 1024 + 5 * 32 + 7] / np.float32(255)
    np.testing.assert_array_equal(ds.x_train, _hwc(x_train) / np.float32(255))
    np.testing.assert_array_equal(ds.x_test, _hwc(x_test) / np.float32(255))
    np.testing.assert_array_equal(ds.y_train, y_train)
    np.testing.assert_array_equal(ds.y_test, y_test)
    np.testing.assert_allclose(ds.mean, ds.x_train.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(ds.std, ds.x_train.std(axis=(0, 1, 2)), rtol=1e-5)


def test_cached_file_is_used_without_downloading(cifar10, monkeypatch):
    _, remote, cache = cifar10
    first = data.load("cifar10", root=cache, num_train=4, num_test=1)
    monkeypatch.setattr(data, "CIFAR10_FILES", {
        "cifar-10-python.tar.gz": data.RemoteFile("file:///nowhere/at/all.tar.gz", remote.md5)})
    again = data.load("cifar10", root=cache, download=False, num_train=4, num_test=1)
    np.testing.assert_array_equal(first.x_train, again.x_train)
    assert len(again.x_train) == 4 and len(again.x_test) == 1


def test_cifar100_uses_the_fine_labels(tmp_path, monkeypatch):
    x_train, y_train, x_test, y_test = _write_cifar100(tmp_path / "cifar-100-python.tar.gz",
                                                       np.random.default_rng(1))
    _serve(monkeypatch, "CIFAR100_FILES", tmp_path, ["cifar-100-python.tar.gz"])
    ds = data.load("cifar100", root=tmp_path / "cache")
    assert ds.num_classes == 100 and ds.input_shape == (32, 32, 3)
    np.testing.assert_array_equal(ds.x_train, _hwc(x_train) / np.float32(255))
    np.testing.assert_array_equal(ds.x_test, _hwc(x_test) / np.float32(255))
    np.testing.assert_array_equal(ds.y_train, y_train)
    np.testing.assert_array_equal(ds.y_test, y_test)


def test_fashion_mnist_idx_files(tmp_path, monkeypatch):
    arrays = _write_fashion_mnist(tmp_path, np.random.default_rng(2))
    _serve(monkeypatch, "FASHION_MNIST_FILES", tmp_path, list(arrays))
    ds = data.load("fashion-mnist", root=tmp_path / "cache")
    assert ds.input_shape == (28, 28, 1) and (ds.crop_padding, ds.flip) == (2, True)
    np.testing.assert_array_equal(
        ds.x_train[..., 0], arrays["train-images-idx3-ubyte.gz"] / np.float32(255))
    np.testing.assert_array_equal(
        ds.x_test[..., 0], arrays["t10k-images-idx3-ubyte.gz"] / np.float32(255))
    np.testing.assert_array_equal(ds.y_train, arrays["train-labels-idx1-ubyte.gz"])
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte.gz"])
    assert len(list((tmp_path / "cache" / "fashion-mnist").iterdir())) == 4


def test_unreachable_url_names_the_url_and_where_to_put_the_file(tmp_path, monkeypatch):
    url = (tmp_path / "missing.tar.gz").as_uri()
    monkeypatch.setattr(data, "CIFAR10_FILES", {
        "cifar-10-python.tar.gz": data.RemoteFile(url, "0" * 32)})
    target = tmp_path / "cache" / "cifar10" / "cifar-10-python.tar.gz"
    with pytest.raises(OSError) as error:
        data.load("cifar10", root=tmp_path / "cache")
    assert url in str(error.value) and str(target) in str(error.value)
    assert "download=False" in str(error.value)
    assert list(target.parent.iterdir()) == []  # no partial file left behind


def test_no_network_is_reported_the_same_way(cifar10, monkeypatch):
    _, remote, cache = cifar10

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(ConnectionError, match="name resolution") as error:
        data.load("cifar10", root=cache)
    assert remote.url in str(error.value)
    assert str(cache / "cifar10" / "cifar-10-python.tar.gz") in str(error.value)


def test_download_false_with_an_empty_cache(cifar10):
    _, remote, cache = cifar10
    with pytest.raises(FileNotFoundError, match="download=False") as error:
        data.load("cifar10", root=cache, download=False)
    assert remote.url in str(error.value)
    assert str(cache / "cifar10" / "cifar-10-python.tar.gz") in str(error.value)
    assert not cache.exists()


def test_corrupt_file_is_refused_with_both_checksums(cifar10):
    _, remote, cache = cifar10
    path = cache / "cifar10" / "cifar-10-python.tar.gz"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"half a download")
    with pytest.raises(ValueError, match="Delete it") as error:
        data.load("cifar10", root=cache)
    assert remote.md5 in str(error.value) and _md5(path) in str(error.value)
    assert str(path) in str(error.value)


def test_downloaded_file_with_a_wrong_checksum_is_refused(cifar10, monkeypatch):
    _, remote, cache = cifar10
    monkeypatch.setattr(data, "CIFAR10_FILES", {
        "cifar-10-python.tar.gz": data.RemoteFile(remote.url, "f" * 32)})
    with pytest.raises(ValueError, match="f" * 32):
        data.load("cifar10", root=cache)


def test_data_dir_and_the_environment_variable(cifar10, tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    assert data.data_dir() == data.pathlib.Path.home() / ".cache" / "sam_edu"
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "env"))
    assert data.data_dir() == tmp_path / "env"
    data.load("cifar10", num_train=2, num_test=2)
    assert (tmp_path / "env" / "cifar10" / "cifar-10-python.tar.gz").is_file()


# --- digits and synthetic data --------------------------------------------------------------

def test_digits_through_load_is_digits_as_images():
    ds = data.load("digits", label_noise=0.3, seed=1)
    x_train, y_train, x_test, y_test = data.digits(label_noise=0.3, seed=1)
    assert ds.input_shape == (8, 8, 1) and ds.x_train.dtype == np.float32
    assert (ds.crop_padding, ds.flip, ds.num_classes) == (1, False, 10)
    np.testing.assert_array_equal(ds.x_train, x_train.reshape(-1, 8, 8, 1).astype(np.float32))
    np.testing.assert_array_equal(ds.x_test, x_test.reshape(-1, 8, 8, 1).astype(np.float32))
    np.testing.assert_array_equal(ds.y_train, y_train)
    np.testing.assert_array_equal(ds.y_test, y_test)


def test_synthetic_cifar_shapes_and_determinism():
    ds = data.load("synthetic-cifar10", num_train=3000, num_test=200, seed=3)
    assert ds.x_train.shape == (3000, 32, 32, 3) and ds.x_test.shape == (200, 32, 32, 3)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert set(np.unique(ds.y_train)) == set(range(10))
    same = data.load("synthetic-cifar10", num_train=100, num_test=200, seed=3)
    np.testing.assert_array_equal(same.x_train, ds.x_train[:100])  # a cut, not a new draw
    np.testing.assert_array_equal(same.x_test, ds.x_test)
    other = data.load("synthetic-cifar10", num_train=100, num_test=1, seed=4)
    assert not np.array_equal(other.x_train, same.x_train)
    hundred = data.load("synthetic-cifar100", num_train=2000, num_test=1)
    assert hundred.num_classes == 100 and hundred.y_train.max() >= 90


def test_synthetic_cifar_is_learnable_but_not_trivially():
    ds = data.load("synthetic-cifar10", num_train=5000, num_test=1000)
    # Nearest class mean, the means estimated from the training split.
    x_train = ds.x_train.reshape(len(ds.x_train), -1)
    x_test = ds.x_test.reshape(len(ds.x_test), -1)
    means = np.stack([x_train[ds.y_train == k].mean(axis=0) for k in range(10)])
    distance = np.square(x_test[:, None, :] - means[None]).sum(axis=-1)
    accuracy = np.mean(distance.argmin(axis=1) == ds.y_test)
    assert accuracy > 0.5, accuracy  # chance: 0.1
    # ...but no single pixel tells much: the noise is stronger than the class signal.
    assert means.std(axis=0).mean() < 0.5 * x_train.std(axis=0).mean()


def test_label_noise_changes_only_training_labels():
    clean = data.load("synthetic-cifar10", num_train=4000, num_test=500)
    noisy = data.load("synthetic-cifar10", num_train=4000, num_test=500, label_noise=0.5)
    np.testing.assert_array_equal(noisy.x_train, clean.x_train)
    np.testing.assert_array_equal(noisy.y_test, clean.y_test)
    changed = np.mean(noisy.y_train != clean.y_train)
    assert abs(changed - 0.5 * 0.9) < 0.04, changed  # a tenth of the redraws hit the true class


def test_add_label_noise_fraction():
    y = np.repeat(np.arange(4), 25_000)
    noisy = data.add_label_noise(y, 0.2, 4, np.random.default_rng(0))
    assert abs(np.mean(noisy != y) - 0.2 * 0.75) < 0.006
    assert np.bincount(noisy, minlength=4).min() > 24_000  # replacements are uniform
    np.testing.assert_array_equal(data.add_label_noise(y, 0.0, 4, np.random.default_rng(0)), y)
    with pytest.raises(ValueError, match="fraction"):
        data.add_label_noise(y, -0.1, 4, np.random.default_rng(0))


@pytest.mark.parametrize("kwargs, argument", [
    ({"name": "mnist"}, "synthetic-cifar10"),
    ({"label_noise": 1.5}, "label_noise"),
    ({"num_train": -1}, "num_train"),
    ({"num_train": 0}, "num_train"),
    ({"num_train": 1258}, "num_train"),
    ({"num_test": 1.5}, "num_test"),
])
def test_bad_arguments_are_named(kwargs, argument):
    kwargs = {"name": "digits"} | kwargs
    with pytest.raises(ValueError, match=argument):
        data.load(kwargs.pop("name"), **kwargs)


# --- augment, standardize, batches ----------------------------------------------------------

def _shift(image, dy, dx):
    """``image`` moved by (dy, dx) pixels, zeros where nothing moved in."""
    out = np.zeros_like(image)
    h, w = image.shape[:2]
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        image[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


def test_augment_crops_are_zero_padded_shifts():
    x = np.random.default_rng(0).random((400, 6, 5, 2), dtype=np.float32) + 1.0
    out = data.augment(x, np.random.default_rng(1), crop_padding=2, flip=False)
    assert out.shape == x.shape and out.dtype == x.dtype
    shifts = set()
    for image, crop in zip(x, out):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if np.array_equal(crop, _shift(image, dy, dx))]
        assert len(matches) == 1
        shifts.add(matches[0])
    assert len(shifts) == 25  # every offset occurs


def test_augment_flips_about_half_and_is_deterministic():
    x = np.random.default_rng(0).random((1000, 4, 4, 3), dtype=np.float32)
    before = x.copy()
    out = data.augment(x, np.random.default_rng(5), crop_padding=0, flip=True)
    np.testing.assert_array_equal(x, before)  # input untouched
    flipped = np.array([np.array_equal(o, i[:, ::-1]) for o, i in zip(out, x)])
    kept = np.array([np.array_equal(o, i) for o, i in zip(out, x)])
    assert np.all(flipped | kept) and 400 < flipped.sum() < 600
    again = data.augment(x, np.random.default_rng(5), crop_padding=4, flip=True)
    np.testing.assert_array_equal(again, data.augment(x, np.random.default_rng(5), 4, True))
    assert not np.array_equal(again, data.augment(x, np.random.default_rng(6), 4, True))
    np.testing.assert_array_equal(data.augment(x, np.random.default_rng(0), 0, False), x)
    with pytest.raises(ValueError, match="crop_padding"):
        data.augment(x, np.random.default_rng(0), crop_padding=-1, flip=False)


def test_standardize():
    ds = data.load("synthetic-cifar10", num_train=500, num_test=10)
    z = data.standardize(ds.x_train, ds.mean, ds.std)
    assert z.dtype == np.float32 and z.shape == ds.x_train.shape
    np.testing.assert_allclose(z.mean(axis=(0, 1, 2), dtype=np.float64), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=(0, 1, 2), dtype=np.float64), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="std"):
        data.standardize(ds.x_train, ds.mean, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="per channel"):
        data.standardize(ds.x_train, (0.5,), (1.0,))


def test_batches_cover_every_index_once_per_epoch():
    rng = np.random.default_rng(0)
    epoch = list(data.batches(10, 3, rng))
    assert [len(b) for b in epoch] == [3, 3, 3, 1]
    np.testing.assert_array_equal(np.sort(np.concatenate(epoch)), np.arange(10))
    assert not np.array_equal(np.concatenate(epoch), np.arange(10))  # shuffled
    dropped = list(data.batches(10, 3, rng, drop_last=True))
    assert [len(b) for b in dropped] == [3, 3, 3] and len(set(np.concatenate(dropped))) == 9
    first = [b.tolist() for b in data.batches(10, 4, np.random.default_rng(7))]
    assert first == [b.tolist() for b in data.batches(10, 4, np.random.default_rng(7))]
    with pytest.raises(ValueError, match="batch_size"):
        data.batches(10, 0, rng)
