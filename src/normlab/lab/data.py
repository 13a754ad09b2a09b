"""Image data sets for the laboratory, as float tensors in [0, 1] with a fixed split.

Every loader returns an `ImageData`: images ``[N, C, H, W]`` (float32, values in [0, 1])
and labels ``[N]`` (int64, ``0 <= y < num_classes``) for a train and a test part.
Sources: the embedded scikit-learn digits (no network), CIFAR-10's python tarball,
MNIST / Fashion-MNIST idx files, a folder of images per class, and ``.npz`` arrays.
Sets without an official test part are split with a seeded stratified split.

Example:
    >>> data = load_data("digits", seed=0)
    >>> data.x_train.shape[1:], data.num_classes
    (torch.Size([1, 16, 16]), 10)
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
import tarfile
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FILE = "cifar-10-python.tar.gz"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class ImageData:
    """A train/test pair of image sets. Images in [0, 1], shape [N, C, H, W]; labels int64."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]


# ---------------------------------------------------------------- checks shared by loaders


def _as_images(x: np.ndarray, source: str) -> torch.Tensor:
    """Turn uint8 or [0, 1] float arrays of shape [N,H,W], [N,H,W,C] or [N,C,H,W] into
    float32 [N, C, H, W] in [0, 1]; anything else is a ValueError naming `source`."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
            x = x.transpose(0, 3, 1, 2)  # channels-last -> channels-first
    else:
        raise ValueError(
            f"{source}: expected images of shape [N, H, W], [N, H, W, C] or [N, C, H, W], "
            f"got shape {x.shape}"
        )
    if x.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(x)).float().div_(255.0)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{source}: expected uint8 or float images, got dtype {x.dtype}")
    if x.size and (not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0):
        raise ValueError(
            f"{source}: expected float images with values in [0, 1] (or uint8 in [0, 255]), "
            f"got values in [{np.nanmin(x):.3g}, {np.nanmax(x):.3g}]"
        )
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _as_labels(
    y: np.ndarray, count: int, source: str, num_classes: int | None = None
) -> torch.Tensor:
    """Check labels: integers, one per image, in [0, num_classes)."""
    y = np.asarray(y)
    if y.ndim != 1 or y.shape[0] != count:
        raise ValueError(f"{source}: expected {count} labels (one per image), got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{source}: expected integer labels, got dtype {y.dtype}")
    if y.size and y.min() < 0:
        raise ValueError(f"{source}: expected labels >= 0, got {int(y.min())}")
    if num_classes is not None and y.size and y.max() >= num_classes:
        raise ValueError(f"{source}: expected labels in [0, {num_classes}), got {int(y.max())}")
    return torch.from_numpy(y.astype(np.int64))


def _check_nonempty(x: torch.Tensor, source: str) -> None:
    if x.shape[0] == 0:
        raise ValueError(f"{source}: expected at least one image, got an empty set")


def stratified_split(
    y: torch.Tensor, test_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, test): each class split in the same proportion, shuffled by `seed`.

    Example:
        >>> train, test = stratified_split(torch.tensor([0, 0, 1, 1]), 0.5, seed=0)
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a value in (0, 1), got {test_fraction}")
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for label in torch.unique(y).tolist():
        members = torch.nonzero(y == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_test = round(len(members) * test_fraction)
        if len(members) >= 2:  # keep every class on both sides when it can be
            n_test = min(max(n_test, 1), len(members) - 1)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return torch.sort(torch.cat(train)).values, torch.sort(torch.cat(test)).values


def _split(
    name: str, x: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int, test_fraction: float
) -> ImageData:
    _check_nonempty(x, name)
    if len(x) < 2:
        raise ValueError(f"{name}: expected at least 2 images to split into train and test, got 1")
    train, test = stratified_split(y, test_fraction, seed)
    return ImageData(name, x[train], y[train], x[test], y[test], num_classes)


# ---------------------------------------------------------------- sources


def load_digits_data(seed: int = 0, test_fraction: float = 0.2) -> ImageData:
    """scikit-learn's 1,797 8x8 digits, upsampled to 16x16 (bilinear), split 80/20."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError(
            "the embedded digits need scikit-learn: pip install 'normlab[lab]'"
        ) from error
    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # values 0..16
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    y = torch.from_numpy(digits.target.astype(np.int64))
    return _split("digits", x, y, 10, seed, test_fraction)


def download_cifar10(cache_dir: str | os.PathLike) -> Path:
    """Fetch CIFAR-10's python tarball into `cache_dir` once (checked by MD5); return its path."""
    path = Path(cache_dir) / CIFAR10_FILE
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".part")
    with urllib.request.urlopen(CIFAR10_URL, timeout=60) as response, open(partial, "wb") as out:
        digest = hashlib.md5()
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != CIFAR10_MD5:
        partial.unlink()
        raise ValueError(
            f"cifar10: downloaded file has MD5 {digest.hexdigest()}, expected {CIFAR10_MD5}"
        )
    partial.replace(path)  # only a complete, verified file gets the final name
    return path


def load_cifar10(path: str | os.PathLike) -> ImageData:
    """CIFAR-10 from its python tarball (``cifar-10-python.tar.gz``): 5 train batches + test.

    The batches are pickles, as published; load only tarballs you trust.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"cifar10: no file {path}")
    try:
        archive = tarfile.open(path, "r:*")
    except tarfile.TarError as error:
        raise ValueError(f"cifar10: {path} is not a tar archive ({error})") from error
    with archive:
        members = {Path(m.name).name: m for m in archive.getmembers() if m.isfile()}

        def batch(name: str) -> tuple[torch.Tensor, torch.Tensor]:
            if name not in members:
                raise ValueError(
                    f"cifar10: expected a member '{name}' in {path} (the python version of "
                    f"CIFAR-10), found {sorted(members)[:8]}"
                )
            entry = pickle.load(archive.extractfile(members[name]), encoding="bytes")
            data = np.asarray(entry[b"data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise ValueError(
                    f"cifar10: expected {name} data of shape [N, 3072], got {data.shape}"
                )
            x = _as_images(data.reshape(-1, 3, 32, 32), f"cifar10 {name}")
            y = _as_labels(np.asarray(entry[b"labels"]), len(x), f"cifar10 {name}", 10)
            return x, y

        train = [batch(f"data_batch_{i}") for i in range(1, 6)]
        x_test, y_test = batch("test_batch")
    x_train = torch.cat([x for x, _ in train])
    y_train = torch.cat([y for _, y in train])
    _check_nonempty(x_train, "cifar10 train")
    _check_nonempty(x_test, "cifar10 test")
    return ImageData("cifar10", x_train, y_train, x_test, y_test, 10)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one idx file (the MNIST format), gzipped or not, as a uint8 array."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"idx: no file {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"idx: {path} does not start with an idx magic number")
    if raw[2] != 0x08:
        raise ValueError(
            f"idx: expected unsigned-byte data (type 0x08) in {path}, got {raw[2]:#04x}"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"idx: {path} is truncated inside its header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape)) if ndim else 0
    if len(raw) - header != expected:
        raise ValueError(
            f"idx: {path} declares shape {shape} ({expected} bytes), holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def _idx_file(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(f"idx: expected {stem} or {stem}.gz in {folder}")


def load_idx_folder(folder: str | os.PathLike, name: str = "mnist") -> ImageData:
    """MNIST or Fashion-MNIST: the four idx files (gz or not) in one folder."""
    folder = Path(folder)
    parts = []
    for prefix in ("train", "t10k"):
        images = read_idx(_idx_file(folder, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_idx_file(folder, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3:
            raise ValueError(f"{name}: expected images of shape [N, H, W], got {images.shape}")
        x = _as_images(images, f"{name} {prefix}")
        _check_nonempty(x, f"{name} {prefix}")
        parts.append((x, _as_labels(labels, len(x), f"{name} {prefix}", 10)))
    (x_train, y_train), (x_test, y_test) = parts
    return ImageData(name, x_train, y_train, x_test, y_test, 10)


def load_image_folder(
    folder: str | os.PathLike, seed: int = 0, test_fraction: float = 0.2
) -> ImageData:
    """A folder with one sub-folder of images per class (names sorted = label order)."""
    try:
        from PIL import Image
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError("reading an image folder needs Pillow: pip install pillow") from error
    folder = Path(folder)
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"image folder: expected one sub-folder per class in {folder}, found none")
    files = [
        (f, label)
        for label, c in enumerate(classes)
        for f in sorted(c.iterdir())
        if f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise ValueError(f"image folder: no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    # One image open at a time (a folder may hold more files than the open-file limit):
    # grey ones are kept grey until a colour one shows up, then all become RGB (L -> RGB
    # repeats the grey value, the same as converting the file).
    arrays = []
    colour = False
    for path, _ in files:
        try:
            with Image.open(path) as im:
                grey = im.mode in ("L", "1", "I;16", "I")
                array = np.asarray(im.convert("L" if grey else "RGB"), dtype=np.uint8)
        except (OSError, ValueError, SyntaxError) as error:  # truncated, not an image
            raise ValueError(
                f"image folder: cannot read {path} as an image ({type(error).__name__}: {error})"
            ) from error
        if not grey and not colour:
            colour = True
            arrays = [np.repeat(a[..., None], 3, axis=-1) for a in arrays]
        if colour and array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        arrays.append(array)
        if arrays[-1].shape[:2] != arrays[0].shape[:2]:
            raise ValueError(
                f"image folder: expected every image to be {arrays[0].shape[1]}x"
                f"{arrays[0].shape[0]} like {files[0][0].name}, got {path.name} of "
                f"{arrays[-1].shape[1]}x{arrays[-1].shape[0]}; resize them first"
            )
    x = _as_images(np.stack(arrays), "image folder")
    y = torch.tensor([label for _, label in files], dtype=torch.int64)
    return _split(folder.name, x, y, len(classes), seed, test_fraction)


def load_npz(path: str | os.PathLike, seed: int = 0, test_fraction: float = 0.2) -> ImageData:
    """Arrays in a ``.npz`` file under keys ``x``/``y`` or ``images``/``labels``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"npz: no file {path}")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            keys = set(arrays.files)
            for xk, yk in (("x", "y"), ("images", "labels")):
                if {xk, yk} <= keys:
                    x_raw, y_raw = arrays[xk], arrays[yk]
                    break
            else:
                raise ValueError(
                    f"npz: expected keys x and y (or images and labels) in {path}, "
                    f"got {sorted(keys)}"
                )
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:  # truncated, corrupt
        raise ValueError(
            f"npz: cannot read {path} as a .npz file ({type(error).__name__}: {error})"
        ) from error
    except ValueError as error:
        if str(error).startswith("npz:"):
            raise
        raise ValueError(f"npz: cannot read {path} as a .npz file ({error})") from error
    x = _as_images(x_raw, f"npz {path.name}")
    _check_nonempty(x, f"npz {path.name}")
    y = _as_labels(y_raw, len(x), f"npz {path.name}")
    return _split(path.stem, x, y, int(y.max()) + 1, seed, test_fraction)


def subsample(data: ImageData, limit: int, seed: int = 0) -> ImageData:
    """Keep at most `limit` train and `limit` test images, class proportions preserved."""
    if limit < 1:
        raise ValueError(f"limit: expected a positive number of images, got {limit}")

    def take(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(x) <= limit:
            return x, y
        _, keep = stratified_split(y, limit / len(x), seed)
        return x[keep], y[keep]

    x_train, y_train = take(data.x_train, data.y_train)
    x_test, y_test = take(data.x_test, data.y_test)
    return ImageData(data.name, x_train, y_train, x_test, y_test, data.num_classes)


def load_data(
    spec: str = "digits",
    *,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
    limit: int | None = None,
) -> ImageData:
    """Load a data set by name or path.

    `spec`: ``digits`` (embedded), ``cifar10`` (tarball in `cache_dir`, downloaded on
    first use), a ``.tar.gz`` CIFAR-10 tarball, a ``.npz`` file, a folder of idx files
    (MNIST, Fashion-MNIST), or a folder with one sub-folder of images per class.

    Example:
        >>> data = load_data("digits", limit=100)
    """
    if spec == "digits":
        data = load_digits_data(seed)
    elif spec == "cifar10":
        cache = Path(cache_dir or Path.home() / ".cache" / "normlab")
        path = cache / CIFAR10_FILE
        if not path.exists():
            if not download:
                raise FileNotFoundError(f"cifar10: no file {path} and downloading is off")
            path = download_cifar10(cache)
        data = load_cifar10(path)
    else:
        path = Path(spec)
        if not path.exists():
            raise FileNotFoundError(
                f"data: expected 'digits', 'cifar10' or an existing path, got {spec!r}"
            )
        if path.is_dir():
            if any(path.glob("train-images-idx3-ubyte*")):
                data = load_idx_folder(path, name=path.name)
            else:
                data = load_image_folder(path, seed)
        elif path.name.endswith((".tar.gz", ".tgz", ".tar")):
            data = load_cifar10(path)
        elif path.suffix == ".npz":
            data = load_npz(path, seed)
        else:
            raise ValueError(
                f"data: expected a .npz file, a CIFAR-10 .tar.gz, or a folder, got {spec!r}"
            )
    return subsample(data, limit, seed) if limit else data
