"""The laboratory's data loaders, each on small files generated here, and their errors."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from normlab.lab.data import (
    load_cifar10,
    load_data,
    load_digits_data,
    load_idx_folder,
    load_image_folder,
    load_npz,
    read_idx,
    stratified_split,
    subsample,
)

# ---------------------------------------------------------------- embedded digits


def _bilinear_1d(n_in: int, n_out: int) -> np.ndarray:
    """Interpolation matrix of half-pixel-centred linear resampling (independent oracle)."""
    matrix = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = min(max((i + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1)
        lo = int(np.floor(src))
        hi = min(lo + 1, n_in - 1)
        matrix[i, lo] += 1 - (src - lo)
        matrix[i, hi] += src - lo
    return matrix


def test_digits_are_upsampled_bilinearly_and_scaled():
    from sklearn.datasets import load_digits

    data = load_digits_data(seed=0)
    raw = load_digits()
    assert data.x_train.shape[1:] == (1, 16, 16) and data.num_classes == 10
    assert len(data.x_train) + len(data.x_test) == 1797
    assert 0.0 <= float(data.x_train.min()) and float(data.x_train.max()) <= 1.0
    # find one training image in the raw set by its label order and compare to the oracle
    m = _bilinear_1d(8, 16)
    expected = np.stack([m @ (img / 16.0) @ m.T for img in raw.images])
    got = torch.cat([data.x_train, data.x_test])[:, 0].double().numpy()
    labels = torch.cat([data.y_train, data.y_test]).numpy()
    # every loaded image equals the oracle of some raw image with the same label
    flat_expected = expected.reshape(1797, -1)
    for image, label in zip(got[:20], labels[:20], strict=True):
        distance = np.abs(flat_expected - image.reshape(1, -1)).max(axis=1)
        match = int(distance.argmin())
        assert distance[match] < 1e-5 and raw.target[match] == label


def test_digits_split_is_stratified_and_seeded():
    a, b, c = load_digits_data(seed=0), load_digits_data(seed=0), load_digits_data(seed=1)
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.y_test, c.y_test) or not torch.equal(a.x_test, c.x_test)
    counts_test = torch.bincount(a.y_test, minlength=10).double()
    counts_all = counts_test + torch.bincount(a.y_train, minlength=10).double()
    assert torch.allclose(
        counts_test / counts_all, torch.full((10,), 0.2, dtype=torch.float64), atol=0.01
    )


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), min_size=2, max_size=60),
    fraction=st.floats(0.05, 0.95),
    seed=st.integers(0, 10),
)
def test_stratified_split_partitions_every_class(labels, fraction, seed):
    y = torch.tensor(labels)
    train, test = stratified_split(y, fraction, seed)
    assert sorted(torch.cat([train, test]).tolist()) == list(range(len(labels)))
    for label in set(labels):
        n = labels.count(label)
        n_test = int((y[test] == label).sum())
        if n >= 2:  # both sides keep the class, proportion within one image
            assert 1 <= n_test <= n - 1
            assert abs(n_test - n * fraction) <= 1.0


def test_split_fraction_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="test_fraction"):
        stratified_split(torch.tensor([0, 1]), 1.5, 0)


def test_subsample_keeps_at_most_limit_with_classes():
    data = subsample(load_digits_data(0), 50)
    assert len(data.x_train) <= 50 and len(data.x_test) <= 50
    assert set(data.y_train.tolist()) == set(range(10))
    with pytest.raises(ValueError, match="limit"):
        subsample(data, 0)


# ---------------------------------------------------------------- CIFAR-10 tarball


def _cifar_batch(n: int, offset: int) -> dict:
    # pixel value encodes (image, channel, row, col) so a wrong reshape is caught
    data = np.zeros((n, 3, 32, 32), dtype=np.uint8)
    for i in range(n):
        for c in range(3):
            data[i, c] = (
                np.arange(32)[:, None] + 7 * np.arange(32)[None, :] + 50 * c + i + offset
            ) % 256
    return {b"data": data.reshape(n, 3072), b"labels": [(i + offset) % 10 for i in range(n)]}


def _write_cifar(path, batches=None, drop=None):
    batches = batches or {f"data_batch_{k}": _cifar_batch(3, 10 * k) for k in range(1, 6)}
    batches.setdefault("test_batch", _cifar_batch(4, 99))
    with tarfile.open(path, "w:gz") as tar:
        for name, entry in batches.items():
            if name == drop:
                continue
            raw = pickle.dumps(entry)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def test_cifar10_tarball_loads_in_channel_major_order(tmp_path):
    path = _write_cifar(tmp_path / "cifar-10-python.tar.gz")
    data = load_cifar10(path)
    assert data.x_train.shape == (15, 3, 32, 32) and data.x_test.shape == (4, 3, 32, 32)
    image, c, row, col = 1, 2, 5, 9  # second image of batch 1 (offset 10)
    expected = (row + 7 * col + 50 * c + image + 10) % 256 / 255.0
    assert data.x_train[image, c, row, col].item() == pytest.approx(expected)
    assert data.y_train[:3].tolist() == [0, 1, 2] and data.y_test.tolist() == [9, 0, 1, 2]
    same = load_data(str(path))  # the path form goes to the same loader
    assert torch.equal(same.x_train, data.x_train)


def test_cifar10_from_cache_without_download(tmp_path):
    _write_cifar(tmp_path / "cifar-10-python.tar.gz")
    data = load_data("cifar10", cache_dir=tmp_path, download=False)
    assert data.name == "cifar10" and len(data.x_train) == 15
    with pytest.raises(FileNotFoundError, match="downloading is off"):
        load_data("cifar10", cache_dir=tmp_path / "empty", download=False)


def test_cifar10_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file"):
        load_cifar10(tmp_path / "missing.tar.gz")
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(ValueError, match="not a tar archive"):
        load_cifar10(tmp_path / "junk.tar.gz")
    with pytest.raises(ValueError, match="data_batch_3"):
        load_cifar10(_write_cifar(tmp_path / "a.tar.gz", drop="data_batch_3"))
    bad = {f"data_batch_{k}": _cifar_batch(2, 0) for k in range(1, 6)}
    bad["data_batch_2"] = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}
    with pytest.raises(ValueError, match=r"labels in \[0, 10\), got 10"):
        load_cifar10(_write_cifar(tmp_path / "b.tar.gz", bad))
    short = {f"data_batch_{k}": _cifar_batch(2, 0) for k in range(1, 6)}
    short["test_batch"] = {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}
    with pytest.raises(ValueError, match="3072"):
        load_cifar10(_write_cifar(tmp_path / "c.tar.gz", short))


# ---------------------------------------------------------------- MNIST idx files


def _idx_bytes(array: np.ndarray) -> bytes:
    return (
        bytes([0, 0, 0x08, array.ndim])
        + struct.pack(f">{array.ndim}I", *array.shape)
        + array.tobytes()
    )


def _write_mnist(folder, compress: bool, labels_train=None):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    parts = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.array(labels_train or [0, 1, 2, 3, 4, 9], dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.array([5, 6, 7], dtype=np.uint8),
    }
    for name, array in parts.items():
        raw = _idx_bytes(array)
        if compress:
            (folder / (name + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return parts


@pytest.mark.parametrize("compress", [False, True])
def test_idx_folder_loads_gz_or_plain(tmp_path, compress):
    parts = _write_mnist(tmp_path / "fashion", compress)
    data = load_data(str(tmp_path / "fashion"))
    assert data.x_train.shape == (6, 1, 28, 28) and data.x_test.shape == (3, 1, 28, 28)
    expected = torch.from_numpy(parts["train-images-idx3-ubyte"].astype(np.float32) / 255)
    assert torch.allclose(data.x_train[:, 0], expected)
    assert data.y_train.tolist() == [0, 1, 2, 3, 4, 9] and data.y_test.tolist() == [5, 6, 7]


def test_idx_errors(tmp_path):
    _write_mnist(tmp_path / "bad", False, labels_train=[0, 1, 2, 3, 4, 12])
    with pytest.raises(ValueError, match=r"labels in \[0, 10\), got 12"):
        load_idx_folder(tmp_path / "bad")
    _write_mnist(tmp_path / "partial", True)
    (tmp_path / "partial" / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-images"):
        load_idx_folder(tmp_path / "partial")
    (tmp_path / "x.idx").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "x.idx")
    (tmp_path / "y.idx").write_bytes(_idx_bytes(np.zeros((4, 2), np.uint8))[:-3])
    with pytest.raises(ValueError, match="declares shape"):
        read_idx(tmp_path / "y.idx")
    (tmp_path / "z.idx").write_bytes(bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 1) + b"\0" * 4)
    with pytest.raises(ValueError, match="0x08"):
        read_idx(tmp_path / "z.idx")


# ---------------------------------------------------------------- image folder


def _write_folder(root, sizes=None, mode="L"):
    from PIL import Image

    sizes = sizes or {}
    values = {}
    for label, name in enumerate(["cat", "dog", "emu"]):
        (root / name).mkdir(parents=True)
        for k in range(4):
            size = sizes.get((name, k), (12, 10))
            value = 20 * label + 5 * k
            pixels = np.full((size[1], size[0]) + ((3,) if mode == "RGB" else ()), value, np.uint8)
            Image.fromarray(pixels, mode).save(root / name / f"{k}.png")
            values[(name, k)] = value
    (root / "cat" / "notes.txt").write_text("not an image")
    return values


def test_image_folder_labels_follow_sorted_class_names(tmp_path):
    values = _write_folder(tmp_path / "pets")
    data = load_data(str(tmp_path / "pets"))
    assert data.num_classes == 3 and data.x_train.shape[1:] == (1, 10, 12)
    x = torch.cat([data.x_train, data.x_test])
    y = torch.cat([data.y_train, data.y_test])
    assert len(x) == 12 and torch.bincount(y).tolist() == [4, 4, 4]
    for image, label in zip(x, y, strict=True):  # each pixel value belongs to its class
        value = round(float(image.mean()) * 255)
        name = ["cat", "dog", "emu"][int(label)]
        assert value in [values[(name, k)] for k in range(4)]


def test_image_folder_rgb(tmp_path):
    _write_folder(tmp_path / "c", mode="RGB")
    assert load_image_folder(tmp_path / "c").x_train.shape[1] == 3


def test_image_folder_errors(tmp_path):
    _write_folder(tmp_path / "mixed", sizes={("dog", 2): (8, 8)})
    with pytest.raises(ValueError, match="resize them first"):
        load_image_folder(tmp_path / "mixed")
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="one sub-folder per class"):
        load_image_folder(tmp_path / "none")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(tmp_path / "empty")


# ---------------------------------------------------------------- npz


@pytest.mark.parametrize("keys", [("x", "y"), ("images", "labels")])
def test_npz_keys_and_layouts(tmp_path, keys):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)  # channels-last
    y = np.arange(20) % 4
    np.savez(tmp_path / "d.npz", **{keys[0]: x, keys[1]: y})
    data = load_data(str(tmp_path / "d.npz"))
    assert data.num_classes == 4 and data.x_train.shape[1:] == (3, 8, 8)
    xs = torch.cat([data.x_train, data.x_test])
    assert len(xs) == 20 and float(xs.max()) <= 1.0
    first = torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32) / 255)
    # every image matches its source (the split only reorders)
    for image in xs:
        assert (first - image).abs().amax(dim=(1, 2, 3)).min() < 1e-6


def test_npz_float_images_in_unit_range(tmp_path):
    x = np.random.default_rng(0).random((6, 5, 5)).astype(np.float32)
    np.savez(tmp_path / "f.npz", x=x, y=np.array([0, 1, 0, 1, 0, 1]))
    data = load_npz(tmp_path / "f.npz")
    assert data.x_train.shape[1:] == (1, 5, 5)


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"x": np.zeros((4, 5, 5), np.uint8), "y": np.array([0, 1, -1, 0])}, "labels >= 0"),
        ({"x": np.zeros((4, 5, 5), np.uint8), "y": np.array([0, 1, 0])}, "expected 4 labels"),
        ({"x": np.zeros((4, 5, 5), np.uint8), "y": np.array([0.5, 1, 0, 1])}, "integer labels"),
        ({"x": np.full((2, 5, 5), 2.0), "y": np.array([0, 1])}, r"values in \[0, 1\]"),
        ({"x": np.zeros((2, 5), np.uint8), "y": np.array([0, 1])}, "shape"),
        ({"x": np.zeros((0, 5, 5), np.uint8), "y": np.zeros(0, int)}, "empty"),
        ({"a": np.zeros((2, 5, 5)), "b": np.array([0, 1])}, "keys x and y"),
    ],
)
def test_npz_bad_data(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=match):
        load_npz(tmp_path / "bad.npz")


def test_load_data_bad_specs(tmp_path):
    with pytest.raises(FileNotFoundError, match="digits"):
        load_data(str(tmp_path / "nowhere.npz"))
    (tmp_path / "table.csv").write_text("1,2")
    with pytest.raises(ValueError, match="expected a .npz"):
        load_data(str(tmp_path / "table.csv"))
    (tmp_path / "broken.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read"):
        load_data(str(tmp_path / "broken.npz"))
