"""Tests for graphduo.data: every loader runs on small files written here, offline."""

import functools
import gzip
import hashlib
import ast
import http.server
import io
import os
import pathlib
import pickle
import socket
import struct
import tarfile
import threading

import numpy as np
import pytest

from graphduo import data
from graphduo.data import DataError

IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def assert_one_line(err: pytest.ExceptionInfo, *fragments: str) -> str:
    message = str(err.value)
    assert message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def assert_standardized(x: np.ndarray) -> None:
    axes = tuple(range(x.ndim - 1))
    np.testing.assert_allclose(x.mean(axis=axes, dtype=np.float64), 0.0, atol=1e-4)
    np.testing.assert_allclose(x.std(axis=axes, dtype=np.float64), 1.0, atol=1e-3)


def unstandardize(x: np.ndarray, reference_train: np.ndarray) -> np.ndarray:
    """Maps standardized `x` back to [0, 1] using the statistics of the raw train images."""
    axes = tuple(range(reference_train.ndim - 1))
    mean = reference_train.mean(axis=axes, dtype=np.float64)
    std = reference_train.std(axis=axes, dtype=np.float64)
    return x * std + mean


# IDX files.


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def make_idx_arrays(n_train=24, n_test=8, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def write_idx_files(folder: pathlib.Path, arrays: dict, *, gz: bool) -> dict[str, pathlib.Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, array in arrays.items():
        magic = 2051 if key.endswith("images") else 2049
        payload = idx_bytes(array, magic)
        path = folder / (IDX_NAMES[key] + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(payload, mtime=0) if gz else payload)
        paths[key] = path
    return paths


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_idx_loads(tmp_path, name, gz):
    arrays = make_idx_arrays()
    write_idx_files(tmp_path / name, arrays, gz=gz)

    ds = data.load_dataset(name, data_dir=tmp_path)

    assert ds.name == name and ds.num_classes == 10 and ds.input_shape == (28, 28, 1)
    assert ds.x_train.shape == (24, 28, 28, 1) and ds.x_test.shape == (8, 28, 28, 1)
    assert ds.x_train.dtype == ds.x_test.dtype == np.float32
    assert ds.y_train.dtype == ds.y_test.dtype == np.int32
    np.testing.assert_array_equal(ds.y_train, arrays["train_labels"])
    np.testing.assert_array_equal(ds.y_test, arrays["test_labels"])
    assert_standardized(ds.x_train)
    raw_train = arrays["train_images"][..., None] / 255.0
    raw_test = arrays["test_images"][..., None] / 255.0
    np.testing.assert_allclose(unstandardize(ds.x_train, raw_train), raw_train, atol=1e-5)
    np.testing.assert_allclose(unstandardize(ds.x_test, raw_train), raw_test, atol=1e-5)


def test_idx_default_data_dir_from_env(tmp_path, monkeypatch):
    write_idx_files(tmp_path / "mnist", make_idx_arrays(), gz=True)
    monkeypatch.setenv("GRAPHDUO_DATA", str(tmp_path))
    assert data.load_dataset("mnist").x_train.shape == (24, 28, 28, 1)


def _wrong_magic(paths, arrays):
    paths["train_images"].write_bytes(idx_bytes(arrays["train_images"], 2049))
    return "train_images", "magic number 2049"


def _truncated(paths, arrays):
    payload = idx_bytes(arrays["test_images"], 2051)
    paths["test_images"].write_bytes(payload[:-100])
    return "test_images", "truncated"


def _truncated_header(paths, arrays):
    paths["train_labels"].write_bytes(struct.pack(">I", 2049) + b"\x00\x00")
    return "train_labels", "truncated"


def _count_mismatch(paths, arrays):
    paths["train_labels"].write_bytes(idx_bytes(arrays["train_labels"][:-1], 2049))
    return "train_labels", "23 labels"


def _label_out_of_range(paths, arrays):
    labels = arrays["test_labels"].copy()
    labels[3] = 12
    paths["test_labels"].write_bytes(idx_bytes(labels, 2049))
    return "test_labels", "label 12 is out of range"


def _missing(paths, arrays):
    paths["test_labels"].unlink()
    return "test_labels", "--download"


def _empty_file(paths, arrays):
    paths["train_images"].write_bytes(b"")
    return "train_images", "truncated"


@pytest.mark.parametrize(
    "corrupt",
    [
        _wrong_magic,
        _truncated,
        _truncated_header,
        _count_mismatch,
        _label_out_of_range,
        _missing,
        _empty_file,
    ],
)
def test_idx_bad_files_raise_one_line_naming_the_file(tmp_path, corrupt):
    arrays = make_idx_arrays()
    paths = write_idx_files(tmp_path / "mnist", arrays, gz=False)
    key, problem = corrupt(paths, arrays)

    with pytest.raises(DataError) as err:
        data.load_dataset("mnist", data_dir=tmp_path)

    assert_one_line(err, IDX_NAMES[key], problem)


def test_idx_label_error_names_the_valid_range(tmp_path):
    arrays = make_idx_arrays()
    arrays["train_labels"][0] = 10
    write_idx_files(tmp_path / "fashion-mnist", arrays, gz=True)
    with pytest.raises(DataError) as err:
        data.load_dataset("fashion-mnist", data_dir=tmp_path)
    assert_one_line(err, "train-labels-idx1-ubyte.gz", "label 10", "[0, 9]")


def test_idx_corrupt_gzip(tmp_path):
    paths = write_idx_files(tmp_path / "mnist", make_idx_arrays(), gz=True)
    paths["train_images"].write_bytes(paths["train_images"].read_bytes()[:50])
    with pytest.raises(DataError) as err:
        data.load_dataset("mnist", data_dir=tmp_path)
    assert_one_line(err, "train-images-idx3-ubyte.gz")


def test_idx_missing_folder_lists_every_file_and_the_fix(tmp_path):
    with pytest.raises(DataError) as err:
        data.load_dataset("mnist", data_dir=tmp_path)
    assert_one_line(err, *IDX_NAMES.values(), str(tmp_path / "mnist"), "--download")


# CIFAR-10.


def make_cifar_batches(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return {
        name: {
            b"batch_label": name.encode(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
        }
        for name in CIFAR_BATCHES
    }


def write_cifar_batches(folder: pathlib.Path, batches: dict, protocol=2, numpy1=False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, batch in batches.items():
        payload = pickle.dumps(batch, protocol=protocol)
        if numpy1:  # The published batches name numpy.core, as numpy < 2 did.
            payload = payload.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        (folder / name).write_bytes(payload)


def check_cifar(ds, batches):
    train = [batches[f"data_batch_{i}"] for i in range(1, 6)]
    raw_train = np.concatenate([b[b"data"] for b in train]).reshape(-1, 3, 32, 32)
    raw_train = raw_train.transpose(0, 2, 3, 1) / 255.0
    raw_test = batches["test_batch"][b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1) / 255.0
    assert ds.input_shape == (32, 32, 3) and ds.num_classes == 10
    assert ds.x_train.shape == (15, 32, 32, 3) and ds.x_test.shape == (3, 32, 32, 3)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.x_train.flags.c_contiguous
    np.testing.assert_array_equal(ds.y_train, sum((b[b"labels"] for b in train), []))
    np.testing.assert_array_equal(ds.y_test, batches["test_batch"][b"labels"])
    assert_standardized(ds.x_train)
    np.testing.assert_allclose(unstandardize(ds.x_train, raw_train), raw_train, atol=1e-5)
    np.testing.assert_allclose(unstandardize(ds.x_test, raw_train), raw_test, atol=1e-5)


@pytest.mark.parametrize(
    "protocol, numpy1", [(2, False), (2, True), (pickle.HIGHEST_PROTOCOL, False)]
)
def test_cifar_loads_batches(tmp_path, protocol, numpy1):
    batches = make_cifar_batches()
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    write_cifar_batches(folder, batches, protocol, numpy1)
    assert numpy1 == (b"numpy.core" in (folder / "test_batch").read_bytes())
    check_cifar(data.load_dataset("cifar10", data_dir=tmp_path), batches)


def test_cifar_loads_tar_gz_and_ignores_unsafe_members(tmp_path):
    batches = make_cifar_batches()
    (tmp_path / "cifar10").mkdir()
    with tarfile.open(tmp_path / "cifar10" / "cifar-10-python.tar.gz", "w:gz") as tar:

        def add(name, payload):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

        for name, batch in batches.items():
            add(f"cifar-10-batches-py/{name}", pickle.dumps(batch, protocol=2))
        add("../escaped", b"x")
        add("cifar-10-batches-py/../../escaped2", b"x")
        link = tarfile.TarInfo("cifar-10-batches-py/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)

    check_cifar(data.load_dataset("cifar10", data_dir=tmp_path), batches)
    assert not (tmp_path / "escaped").exists() and not (tmp_path.parent / "escaped").exists()
    assert not (tmp_path / "escaped2").exists()
    extracted = sorted(p.name for p in (tmp_path / "cifar10" / "cifar-10-batches-py").iterdir())
    assert extracted == sorted(CIFAR_BATCHES)


def test_cifar_corrupt_tar_gz(tmp_path):
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "cifar10" / "cifar-10-python.tar.gz").write_bytes(b"not a tar file at all")
    with pytest.raises(DataError) as err:
        data.load_dataset("cifar10", data_dir=tmp_path)
    assert_one_line(err, "cifar-10-python.tar.gz")


def _truncated_pickle(path, batches):
    path.write_bytes(path.read_bytes()[:1000])


def _garbage(path, batches):
    path.write_bytes(b"\x00garbage\n" * 10)


def _wrong_shape(path, batches):
    batch = {**batches["data_batch_2"], b"data": np.zeros((3, 100), np.uint8)}
    path.write_bytes(pickle.dumps(batch))


def _label_count(path, batches):
    batch = {**batches["data_batch_2"], b"labels": [1, 2]}
    path.write_bytes(pickle.dumps(batch))


def _not_a_dict(path, batches):
    path.write_bytes(pickle.dumps([1, 2, 3]))


@pytest.mark.parametrize(
    "corrupt", [_truncated_pickle, _garbage, _wrong_shape, _label_count, _not_a_dict]
)
def test_cifar_corrupt_batch_raises(tmp_path, corrupt):
    batches = make_cifar_batches()
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    write_cifar_batches(folder, batches)
    corrupt(folder / "data_batch_2", batches)
    with pytest.raises(DataError) as err:
        data.load_dataset("cifar10", data_dir=tmp_path)
    assert_one_line(err, "data_batch_2")


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.remove, (self.path,))


def test_cifar_refuses_pickles_that_run_code(tmp_path):
    canary = tmp_path / "canary"
    canary.write_text("still here")
    batches = make_cifar_batches()
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    write_cifar_batches(folder, batches)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(str(canary))}))
    with pytest.raises(DataError) as err:
        data.load_dataset("cifar10", data_dir=tmp_path)
    assert_one_line(err, "test_batch")
    assert canary.exists()


def test_cifar_label_out_of_range(tmp_path):
    batches = make_cifar_batches()
    batches["test_batch"][b"labels"][1] = -1
    write_cifar_batches(tmp_path / "cifar10" / "cifar-10-batches-py", batches)
    with pytest.raises(DataError) as err:
        data.load_dataset("cifar10", data_dir=tmp_path)
    assert_one_line(err, "test_batch", "label -1", "[0, 9]")


def test_cifar_missing_files(tmp_path):
    batches = make_cifar_batches()
    del batches["data_batch_4"]
    write_cifar_batches(tmp_path / "cifar10" / "cifar-10-batches-py", batches)
    with pytest.raises(DataError) as err:
        data.load_dataset("cifar10", data_dir=tmp_path)
    message = assert_one_line(err, "data_batch_4", "cifar-10-python.tar.gz", "--download")
    assert "data_batch_3" not in message


# Downloading, from a local HTTP server.


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    """Serves tmp_path/"served" on 127.0.0.1 and yields (folder, base_url)."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def serve_idx(served: pathlib.Path) -> dict[str, str]:
    """Writes gzipped IDX files into `served` and returns their md5 checksums."""
    paths = write_idx_files(served, make_idx_arrays(), gz=True)
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in paths.values()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_then_load(tmp_path, server):
    served, url = server
    checksums = serve_idx(served)
    root = tmp_path / "data"

    paths = data.download("mnist", root, base_url=url, checksums=checksums)

    assert sorted(p.name for p in paths) == sorted(checksums)
    assert sorted(os.listdir(root / "mnist")) == sorted(checksums)
    for path in paths:
        assert path.read_bytes() == (served / path.name).read_bytes()
    assert data.load_dataset("mnist", data_dir=root).x_train.shape == (24, 28, 28, 1)
    # Files already in place with the right checksum are not fetched again.
    dead = f"http://127.0.0.1:{free_port()}/"
    assert data.download("mnist", root, base_url=dead, checksums=checksums) == paths


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["shared-022", "private-077"])
def test_downloaded_files_get_the_umask_permissions_not_private_ones(tmp_path, server, umask):
    """A file fetched into a shared --data-dir must be as readable as any file the process writes:
    0666 less the umask (0644 under 022), not a private temporary file's 0600. Under umask 077 the
    same check expects 0600: the permissions follow the umask, not a fixed mode."""
    served, url = server
    checksums = serve_idx(served)
    old = os.umask(umask)
    try:
        paths = data.download("mnist", tmp_path / "data", base_url=url, checksums=checksums)
    finally:
        os.umask(old)
    modes = {oct(p.stat().st_mode & 0o777) for p in paths}
    assert modes == {oct(0o666 & ~umask)}


def test_load_dataset_download_true_uses_the_mirror_table(tmp_path, server, monkeypatch):
    served, url = server
    monkeypatch.setitem(data._MIRRORS, "fashion-mnist", url)
    monkeypatch.setitem(data._CHECKSUMS, "fashion-mnist", serve_idx(served))
    ds = data.load_dataset("fashion-mnist", data_dir=tmp_path / "data", download=True)
    assert ds.x_test.shape == (8, 28, 28, 1)


def test_download_wrong_checksum_leaves_nothing(tmp_path, server):
    served, url = server
    checksums = serve_idx(served)
    checksums["t10k-labels-idx1-ubyte.gz"] = "0" * 32
    root = tmp_path / "data"
    with pytest.raises(DataError) as err:
        data.download("mnist", root, base_url=url, checksums=checksums)
    assert_one_line(err, "t10k-labels-idx1-ubyte.gz", "md5", "0" * 32)
    assert not (root / "mnist" / "t10k-labels-idx1-ubyte.gz").exists()
    assert not [p for p in os.listdir(root / "mnist") if "part" in p or p.startswith(".")]


def test_download_404(tmp_path, server):
    _, url = server
    root = tmp_path / "data"
    with pytest.raises(DataError) as err:
        data.download("cifar10", root, base_url=url, checksums={"nothing-here.tar.gz": "0" * 32})
    assert_one_line(err, "nothing-here.tar.gz", "404")
    assert os.listdir(root / "cifar10") == []


def test_download_network_error(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "*")
    root = tmp_path / "data"
    with pytest.raises(DataError) as err:
        data.download(
            "mnist", root, base_url=f"http://127.0.0.1:{free_port()}", checksums={"f.gz": "0" * 32}
        )
    assert_one_line(err, "f.gz")
    assert os.listdir(root / "mnist") == []


def test_download_needs_nothing_for_builtin_data(tmp_path):
    assert data.download("digits", tmp_path) == []
    assert data.download("synthetic", tmp_path) == []
    assert os.listdir(tmp_path) == []


# digits.


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits")


def test_digits_shapes_and_dtypes(digits):
    assert digits.name == "digits" and digits.num_classes == 10
    assert digits.input_shape == (8, 8, 1)
    assert len(digits.x_train) + len(digits.x_test) == 1797
    assert len(digits.x_test) == pytest.approx(0.2 * 1797, abs=10)
    assert digits.x_train.dtype == digits.x_test.dtype == np.float32
    assert digits.y_train.dtype == digits.y_test.dtype == np.int32
    assert digits.y_train.shape == (len(digits.x_train),)
    assert set(np.unique(digits.y_train)) == set(range(10))
    assert set(np.unique(digits.y_test)) == set(range(10))


def test_digits_split_is_fixed(digits):
    other = data.load_dataset("digits", seed=123)
    for field in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(digits, field), getattr(other, field))


def test_digits_split_is_disjoint(digits):
    train_rows = {row.tobytes() for row in digits.x_train}
    shared = sum(row.tobytes() in train_rows for row in digits.x_test)
    assert shared <= 0.02 * len(digits.x_test)


def test_digits_normalized(digits):
    assert_standardized(digits.x_train)
    assert abs(digits.x_test.mean()) < 0.1 and abs(digits.x_test.std() - 1) < 0.1


# Names and validation.


def test_data_module_does_not_import_jax():
    tree = ast.parse(pathlib.Path(data.__file__).read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {m for m in imported if m and m.split(".")[0] in ("jax", "flax", "optax")}


def test_unknown_name_lists_the_choices():
    with pytest.raises(DataError) as err:
        data.load_dataset("imagenet")
    assert_one_line(err, "imagenet", *data.DATASETS)
    with pytest.raises(DataError):
        data.download("imagenet", "/nonexistent")


def test_dataset_rejects_bad_arrays():
    x = np.zeros((4, 2, 2, 1), np.float32)
    y = np.zeros(4, np.int32)
    with pytest.raises(DataError) as err:
        data.Dataset("toy", x, y, x, np.full(4, 3, np.int32), num_classes=3)
    assert_one_line(err, "toy test set", "label 3", "[0, 2]")
    with pytest.raises(DataError):
        data.Dataset("toy", x[:0], y[:0], x, y, num_classes=3)
    with pytest.raises(DataError):
        data.Dataset("toy", x, y[:3], x, y, num_classes=3)


# synthetic.


@pytest.mark.parametrize("shape, size", [((28, 28, 1), 64), ((5, 7, 3), 10), ((1, 1, 1), 3)])
def test_synthetic_any_shape(shape, size):
    ds = data.load_dataset("synthetic", synthetic_shape=shape, synthetic_size=size)
    assert ds.input_shape == shape and ds.num_classes == 10
    assert ds.x_train.shape == (size, *shape)
    assert ds.x_test.shape == (max(1, size // 4), *shape)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.y_train.min() >= 0 and ds.y_train.max() < 10


def test_synthetic_is_deterministic_in_seed():
    kwargs = dict(synthetic_shape=(4, 4, 2), synthetic_size=32, synthetic_classes=3)
    a = data.load_dataset("synthetic", seed=1, **kwargs)
    b = data.load_dataset("synthetic", seed=1, **kwargs)
    c = data.load_dataset("synthetic", seed=2, **kwargs)
    for field in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.x_train, c.x_train)
    assert a.num_classes == 3 and a.y_train.max() < 3


def test_synthetic_is_learnable():
    ds = data.load_dataset(
        "synthetic", synthetic_shape=(6, 6, 2), synthetic_size=2048, synthetic_classes=10
    )
    assert len(np.unique(ds.y_train)) == 10
    assert_standardized(ds.x_train)

    def features(x):
        return np.c_[x.reshape(len(x), -1), np.ones(len(x))]

    targets = np.eye(10)[ds.y_train]
    weights, *_ = np.linalg.lstsq(features(ds.x_train), targets, rcond=None)
    accuracy = np.mean(np.argmax(features(ds.x_test) @ weights, axis=1) == ds.y_test)
    assert accuracy > 0.6  # Chance is 0.1.


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(synthetic_shape=(0, 28, 1)),
        dict(synthetic_shape=(28, 28)),
        dict(synthetic_shape=(28, -1, 1)),
        dict(synthetic_size=0),
        dict(synthetic_size=-5),
        dict(synthetic_classes=0),
    ],
)
def test_synthetic_rejects_bad_parameters(kwargs):
    with pytest.raises(DataError) as err:
        data.load_dataset("synthetic", **kwargs)
    assert_one_line(err, "synthetic_")


# Batching.


def toy_arrays(n=10):
    x = np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((1, 2, 2, 1), np.float32)
    return x, np.arange(n, dtype=np.int32)


def order(batches):
    return np.concatenate([b["label"] for b in batches])


def test_epoch_batches_shapes_and_pairing():
    x, y = toy_arrays(10)
    batches = list(data.epoch_batches(x, y, 3, seed=0, epoch=0))
    assert len(batches) == data.steps_per_epoch(10, 3) == 3
    for batch in batches:
        assert set(batch) == {"image", "label"}
        assert batch["image"].shape == (3, 2, 2, 1) and batch["label"].shape == (3,)
        np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], batch["label"])


def test_epoch_batches_uses_each_sample_at_most_once():
    x, y = toy_arrays(103)
    seen = order(data.epoch_batches(x, y, 10, seed=4, epoch=2))
    assert len(seen) == 100 and len(np.unique(seen)) == 100


def test_epoch_batches_deterministic_per_seed_and_epoch():
    x, y = toy_arrays(50)

    def run(seed, epoch):
        return order(data.epoch_batches(x, y, 5, seed=seed, epoch=epoch))

    np.testing.assert_array_equal(run(0, 0), run(0, 0))
    np.testing.assert_array_equal(run(7, 3), run(7, 3))
    assert not np.array_equal(run(0, 0), run(0, 1))
    assert not np.array_equal(run(0, 0), run(1, 0))
    expected = np.random.default_rng([7, 3]).permutation(50)
    np.testing.assert_array_equal(run(7, 3), expected)


def test_epoch_batches_rejects_impossible_requests():
    x, y = toy_arrays(10)
    with pytest.raises(DataError):
        data.epoch_batches(x, y, 11, seed=0, epoch=0)
    with pytest.raises(DataError):
        data.epoch_batches(x, y[:9], 2, seed=0, epoch=0)
    with pytest.raises(ValueError):
        data.steps_per_epoch(10, 0)
    assert data.steps_per_epoch(10, 10) == 1 and data.steps_per_epoch(9, 10) == 0
