"""Image classification data sets as normalized numpy arrays.

Everything here is numpy only, so loading data never initializes an accelerator.
Images come out as float32 NHWC arrays, scaled to [0, 1] and then standardized per
channel with the training set's statistics; labels come out as int32.

Data sets:

* ``digits``: scikit-learn's 1797 8x8 handwritten digits (bundled, no network). The
  train/test split is fixed: a stratified 80/20 split drawn once from
  ``np.random.default_rng(0)``, independent of any seed.
* ``mnist``, ``fashion-mnist``: the four standard IDX files (raw or ``.gz``) in
  ``<data_dir>/<name>/``.
* ``cifar10``: the python pickle batches in ``<data_dir>/cifar10/cifar-10-batches-py/``,
  or ``cifar-10-python.tar.gz`` in ``<data_dir>/cifar10/``.
* ``synthetic``: random images of any shape labelled by a random linear teacher.

``data_dir`` defaults to ``$GRAPHDUO_DATA`` or else ``~/.cache/graphduo``.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import os
import pathlib
import pickle
import struct
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator

import numpy as np

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "synthetic")


class DataError(ValueError):
    """Bad or missing data. str(err) is ONE line naming the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A train/test split of images (float32 NHWC) and integer labels (int32)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    def __post_init__(self):
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            where = f"{self.name} {split} set"
            if x.ndim != 4:
                raise DataError(f"{where}: images must have shape (N, H, W, C), got {x.shape}")
            if len(x) == 0:
                raise DataError(f"{where} is empty; check the data files")
            if y.shape != (len(x),):
                raise DataError(f"{where}: {len(x)} images but labels of shape {y.shape}")
            _check_labels(y, self.num_classes, where)
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(
                f"{self.name}: train images are {self.x_train.shape[1:]} but test images are "
                f"{self.x_test.shape[1:]}; the files come from different data sets"
            )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The shape of one image, (H, W, C)."""
        return tuple(int(d) for d in self.x_train.shape[1:])


# Files and mirrors.

_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TAR = "cifar-10-python.tar.gz"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = ("test_batch",)

_MIRRORS = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/",
}
_CHECKSUMS = {  # md5, as published by the data sets' authors.
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    "cifar10": {_CIFAR_TAR: "c58f30108f718f92721af3b95e74349a"},
}
_HASHES_BY_HEX_LENGTH = {32: "md5", 40: "sha1", 64: "sha256", 128: "sha512"}
_TIMEOUT_S = 60


def _root_dir(data_dir: str | os.PathLike | None) -> pathlib.Path:
    if data_dir is None:
        data_dir = os.environ.get("GRAPHDUO_DATA") or "~/.cache/graphduo"
    return pathlib.Path(data_dir).expanduser()


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of: {', '.join(DATASETS)}")


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        value = labels[np.argmax(bad)]
        raise DataError(
            f"{where}: label {value} is out of range, labels must lie in [0, {num_classes - 1}]; "
            "the file is corrupt or belongs to another data set"
        )


# Public API.


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    synthetic_shape: tuple[int, int, int] = (28, 28, 1),
    synthetic_size: int = 2048,
    synthetic_classes: int = 10,
    seed: int = 0,
) -> Dataset:
    """Loads a data set by name (one of ``DATASETS``), normalized.

    ``seed`` only affects ``synthetic``; the other data sets have fixed splits.
    With ``download=True``, missing files of mnist, fashion-mnist and cifar10 are
    fetched first (this needs network access). Raises ``DataError`` on bad input.
    """
    _check_name(name)
    if name == "digits":
        x_train, y_train, x_test, y_test = _load_digits()
        num_classes = 10
    elif name == "synthetic":
        x_train, y_train, x_test, y_test = _make_synthetic(
            synthetic_shape, synthetic_size, synthetic_classes, seed
        )
        num_classes = synthetic_classes
    else:
        folder = _root_dir(data_dir) / name
        if download and _missing_files(name, folder):
            _download(name, _root_dir(data_dir), base_url=None, checksums=None)
        loader = _load_cifar10 if name == "cifar10" else _load_idx_dataset
        x_train, y_train, x_test, y_test = loader(name, folder)
        num_classes = 10
    x_train, x_test = _standardize(x_train, x_test)
    return Dataset(
        name=name,
        x_train=x_train,
        y_train=y_train.astype(np.int32),
        x_test=x_test,
        y_test=y_test.astype(np.int32),
        num_classes=num_classes,
    )


def steps_per_epoch(n: int, batch_size: int) -> int:
    """The number of full batches in ``n`` samples (the last partial one is dropped)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return n // batch_size


def epoch_batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int, epoch: int,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[dict[str, np.ndarray]]:
    """Yield dicts {"image": x[idx], "label": y[idx]} for one epoch.

    The order is a deterministic permutation from np.random.default_rng([seed, epoch]); the
    last partial batch is dropped so every batch has the same shape.

    ``shard=(i, n)`` yields only the i-th of n equal slices of every global batch: what process
    i of n loads in a multi-process run (``batch_size`` is the global batch, divisible by n).

    Raises ``DataError`` (eagerly, before the first batch) when ``x`` and ``y``
    differ in length or when ``batch_size`` exceeds the number of samples, since
    an epoch without a single batch is never what the caller meant.
    """
    if len(x) != len(y):
        raise DataError(f"epoch_batches: {len(x)} images but {len(y)} labels")
    steps = steps_per_epoch(len(x), batch_size)
    if steps == 0:
        raise DataError(
            f"batch size {batch_size} is larger than the {len(x)} samples; use a smaller batch size"
        )
    index, count = shard
    if batch_size % count or not 0 <= index < count:
        raise DataError(f"epoch_batches: cannot take slice {index} of {count} of a batch of {batch_size}")
    perm = epoch_permutation(len(x), seed=seed, epoch=epoch)
    return _batches(x, y, perm, batch_size, steps, index, batch_size // count)


def epoch_permutation(n: int, *, seed: int, epoch: int) -> np.ndarray:
    """The order of one epoch's ``n`` samples: batch ``i`` is rows ``perm[i * b:(i + 1) * b]``. The
    same for ``epoch_batches`` on the host and for steps that gather their batches on the device."""
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)


def _batches(x, y, perm, batch_size, steps, index, rows):
    for step in range(steps):
        idx = perm[step * batch_size : (step + 1) * batch_size][index * rows : (index + 1) * rows]
        yield {"image": x[idx], "label": y[idx]}


def download(
    name: str,
    data_dir: str | os.PathLike | None,
    *,
    base_url: str | None = None,
    checksums: dict[str, str] | None = None,
) -> list[pathlib.Path]:
    """Downloads a data set's files into ``<data_dir>/<name>/`` and returns their paths.

    ``checksums`` maps file name to hex digest (md5, or sha1/sha256/sha512 by
    length) and replaces the built-in table, so it also decides which files are
    fetched; ``base_url`` replaces the built-in mirror. Files already present with
    the right checksum are kept. Each file is written to a temporary file in the
    target folder, verified, then renamed into place, so no partial file is ever
    left behind. ``digits`` and ``synthetic`` need nothing and return ``[]``.
    """
    _check_name(name)
    return _download(name, _root_dir(data_dir), base_url=base_url, checksums=checksums)


def _download(name, root, *, base_url, checksums):
    if name in ("digits", "synthetic"):
        return []
    table = _CHECKSUMS[name] if checksums is None else checksums
    base = _MIRRORS[name] if base_url is None else base_url
    folder = root / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(
            f"cannot create {folder}: {err.strerror}; pass a writable data_dir"
        ) from err
    paths = []
    for filename, digest in table.items():
        path = folder / filename
        if not (path.is_file() and _file_digest(path, digest) == digest.lower()):
            _fetch(base.rstrip("/") + "/" + urllib.parse.quote(filename), path, digest)
        paths.append(path)
    return paths


# Downloading.


def _hasher(digest: str):
    algorithm = _HASHES_BY_HEX_LENGTH.get(len(digest))
    if algorithm is None:
        raise DataError(f"checksum {digest!r} is not an md5/sha1/sha256/sha512 hex digest")
    return hashlib.new(algorithm)


def _file_digest(path: pathlib.Path, digest: str) -> str:
    hasher = _hasher(digest)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


def _new_part_file(folder: pathlib.Path, name: str) -> tuple[int, str]:
    """``(fd, path)`` of a new, empty ``.<name>.<random>.part`` file in ``folder``, open for writing.

    Created with mode 0666 less the process's umask, as any file the process writes, so the file
    renamed into place is as readable as the user's other files (on a shared ``--data-dir`` too);
    ``tempfile.mkstemp`` would create it private (0600).
    """
    for _ in range(100):
        candidate = folder / f".{name}.{os.urandom(6).hex()}.part"
        try:
            return os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), str(candidate)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary file name for {name} in {folder}")


def _fetch(url: str, path: pathlib.Path, digest: str) -> None:
    hasher = _hasher(digest)
    fd, tmp_name = _new_part_file(path.parent, path.name)
    tmp = pathlib.Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
                    for chunk in iter(lambda: response.read(1 << 20), b""):
                        hasher.update(chunk)
                        out.write(chunk)
            except urllib.error.HTTPError as err:
                err.close()
                raise DataError(
                    f"download of {url} failed: HTTP {err.code} {err.reason}; check the mirror "
                    "(base_url) or put the file in place by hand"
                ) from err
            except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
                reason = getattr(err, "reason", None) or err
                raise DataError(
                    f"download of {url} failed: {reason}; check the network connection, or put "
                    f"{path.name} into {path.parent} by hand"
                ) from err
            out.flush()
            os.fsync(out.fileno())
        if hasher.hexdigest() != digest.lower():
            raise DataError(
                f"download of {url} is corrupt: {hasher.name} {hasher.hexdigest()} but expected "
                f"{digest.lower()}; try again, or use another mirror"
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _missing_files(name: str, folder: pathlib.Path) -> list[str]:
    if name == "cifar10":
        if (folder / _CIFAR_TAR).is_file():
            return []
        return _missing_cifar_batches(folder / _CIFAR_DIR)
    return [f for f in _IDX_FILES if _find_idx(folder, f) is None]


def _missing_cifar_batches(batches: pathlib.Path) -> list[str]:
    return [f for f in _CIFAR_TRAIN + _CIFAR_TEST if not (batches / f).is_file()]


def _missing_error(name: str, folder: pathlib.Path, missing: list[str]) -> DataError:
    if name == "cifar10":
        where = f"{', '.join(missing)} in {folder / _CIFAR_DIR} (or {_CIFAR_TAR} in {folder})"
    else:
        where = f"{', '.join(missing)} (raw or .gz) in {folder}"
    return DataError(
        f"{name}: missing {where}; put the files there, or pass --download to fetch them "
        "(needs network access)"
    )


# digits and synthetic.


def _load_digits():
    from sklearn.datasets import load_digits  # Imported lazily: sklearn is slow to import.

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    y = digits.target.astype(np.int32)
    test = _stratified_test_mask(y, test_fraction=0.2, rng=np.random.default_rng(0))
    return x[~test], y[~test], x[test], y[test]


def _stratified_test_mask(y: np.ndarray, test_fraction: float, rng) -> np.ndarray:
    test = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        test[members[: round(test_fraction * len(members))]] = True
    return test


def _make_synthetic(shape, size, num_classes, seed):
    shape = tuple(shape)
    if len(shape) != 3 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape):
        raise DataError(f"synthetic_shape must be three positive integers (H, W, C), got {shape}")
    if size <= 0:
        raise DataError(f"synthetic_size must be positive, got {size}")
    if num_classes <= 0:
        raise DataError(f"synthetic_classes must be positive, got {num_classes}")
    rng = np.random.default_rng(seed)
    teacher = rng.standard_normal((int(np.prod(shape)), num_classes), dtype=np.float32)

    def sample(n):
        x = rng.random((n, *shape), dtype=np.float32)
        y = np.argmax((x.reshape(n, -1) - 0.5) @ teacher, axis=1).astype(np.int32)
        return x, y

    x_train, y_train = sample(size)
    x_test, y_test = sample(max(1, size // 4))
    return x_train, y_train, x_test, y_test


# MNIST and Fashion-MNIST (IDX files).


def _find_idx(folder: pathlib.Path, filename: str) -> pathlib.Path | None:
    for candidate in (folder / filename, folder / f"{filename}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load_idx_dataset(name: str, folder: pathlib.Path):
    missing = _missing_files(name, folder)
    if missing:
        raise _missing_error(name, folder, missing)
    arrays = []
    for prefix in ("train", "t10k"):
        images_path = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
        labels_path = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
        images = _read_idx(images_path, _IDX_IMAGES_MAGIC)
        labels = _read_idx(labels_path, _IDX_LABELS_MAGIC)
        if len(images) != len(labels):
            raise DataError(
                f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} "
                "labels; one of them is corrupt, re-download both"
            )
        if len(images) == 0:
            raise DataError(f"{images_path} holds no images; re-download it")
        _check_labels(labels, 10, str(labels_path))
        arrays += [_to_unit_interval(images[..., None]), labels.astype(np.int32)]
    return tuple(arrays)


def _read_bytes(path: pathlib.Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path} cannot be read ({err}); delete it and re-download it") from err


def _read_idx(path: pathlib.Path, magic: int) -> np.ndarray:
    raw = _read_bytes(path)
    kind = "images" if magic == _IDX_IMAGES_MAGIC else "labels"
    if len(raw) < 4:
        raise DataError(f"{path} is truncated: only {len(raw)} bytes; re-download it")
    found = struct.unpack(">I", raw[:4])[0]
    if found != magic:
        raise DataError(
            f"{path} is not an IDX {kind} file: magic number {found}, expected {magic}; "
            "check the file name or re-download it"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated: the header is incomplete; re-download it")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims))
    actual = len(raw) - header
    if actual != expected:
        problem = "is truncated" if actual < expected else "has trailing bytes"
        raise DataError(
            f"{path} {problem}: its header promises {expected} bytes of {kind} {dims} but "
            f"{actual} follow; re-download it"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


# CIFAR-10 (python pickle batches).


class _ArrayUnpickler(pickle.Unpickler):
    # Downloaded pickles are untrusted: allow numpy arrays and plain containers, nothing that
    # could run code.

    _ALLOWED = {
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        # Pickles written by numpy < 2 (the published CIFAR-10 ones) name numpy.core.
        if module.startswith("numpy.core."):
            module = "numpy._core." + module.removeprefix("numpy.core.")
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _load_cifar10(name: str, folder: pathlib.Path):
    batches = folder / _CIFAR_DIR
    missing = _missing_cifar_batches(batches)
    if missing and (folder / _CIFAR_TAR).is_file():
        _extract_cifar_tar(folder / _CIFAR_TAR, batches)
        missing = _missing_cifar_batches(batches)
    if missing:
        raise _missing_error(name, folder, missing)
    x_train, y_train = _read_cifar_batches([batches / f for f in _CIFAR_TRAIN])
    x_test, y_test = _read_cifar_batches([batches / f for f in _CIFAR_TEST])
    return x_train, y_train, x_test, y_test


def _extract_cifar_tar(tar_path: pathlib.Path, batches: pathlib.Path) -> None:
    # Only the known batch files are copied out, each to a path we build, so no
    # member name (absolute, "..", link) can write outside the target folder.
    wanted = {f"{_CIFAR_DIR}/{f}": f for f in _CIFAR_TRAIN + _CIFAR_TEST}
    try:
        batches.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tar_path, "r:gz") as tar:
            for member in tar:
                target = wanted.get(member.name.removeprefix("./"))
                if target is None or not member.isfile():
                    continue
                fd, tmp_name = _new_part_file(batches, target)
                try:
                    with os.fdopen(fd, "wb") as out, tar.extractfile(member) as src:
                        while chunk := src.read(1 << 20):
                            out.write(chunk)
                    os.replace(tmp_name, batches / target)
                finally:
                    pathlib.Path(tmp_name).unlink(missing_ok=True)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise DataError(
            f"{tar_path} cannot be extracted ({err}); delete it and re-download it"
        ) from err


def _read_cifar_batches(paths: list[pathlib.Path]):
    images, labels = [], []
    for path in paths:
        x, y = _read_cifar_batch(path)
        images.append(x)
        labels.append(y)
    x = np.concatenate(images).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return _to_unit_interval(x), np.concatenate(labels)


def _read_cifar_batch(path: pathlib.Path):
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as err:  # A corrupt pickle can fail in many ways.
        raise DataError(
            f"{path} is not a valid CIFAR-10 batch ({type(err).__name__}: {' '.join(str(err).split())}); "
            "delete it and re-download it"
        ) from err
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{path} is not a CIFAR-10 batch (no b'data'/b'labels'); re-download it")
    x, y = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) == 0:
        raise DataError(
            f"{path}: b'data' must be uint8 of shape (N, 3072), got {x.dtype} {x.shape}; "
            "re-download it"
        )
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(
            f"{path}: expected {len(x)} integer labels, got {y.dtype} {y.shape}; re-download it"
        )
    _check_labels(y, 10, str(path))
    return x, y


# Normalization.


def _to_unit_interval(images: np.ndarray) -> np.ndarray:
    x = images.astype(np.float32, order="C")
    x /= 255.0
    return x


def _standardize(x_train: np.ndarray, x_test: np.ndarray):
    if len(x_train) == 0 or len(x_test) == 0:
        raise DataError("the data set is empty; check the data files")
    x_train = np.asarray(x_train, dtype=np.float32)
    x_test = np.asarray(x_test, dtype=np.float32)
    channels = x_train.shape[-1]
    mean = np.empty(channels, np.float32)
    std = np.empty(channels, np.float32)
    for c in range(channels):  # Per channel keeps float64 temporaries small.
        mean[c] = x_train[..., c].mean(dtype=np.float64)
        std[c] = x_train[..., c].std(dtype=np.float64)
    std[std == 0] = 1.0  # A constant channel carries no signal; avoid 0/0.
    for x in (x_train, x_test):
        x -= mean
        x /= std
    return x_train, x_test
