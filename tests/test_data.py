"""Fashion-MNIST loading (real files and damaged ones) and partition properties."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedberry.data.fashion_mnist import (
    DEFAULT_DATA_DIR,
    ENV_VAR,
    DatasetNotFoundError,
    IDXFormatError,
    as_images,
    load_fashion_mnist,
    read_idx,
)
from fedberry.data.partition import (
    PartitionSpec,
    dirichlet,
    iid,
    parse_partition_spec,
    partition,
    shards,
)

real_data = pytest.mark.skipif(
    not (DEFAULT_DATA_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason="needs `apt-get install dataset-fashion-mnist`",
)


def idx_bytes(a: np.ndarray, code: int = 0x08) -> bytes:
    return (
        struct.pack(">BBBB", 0, 0, code, a.ndim)
        + struct.pack(f">{a.ndim}I", *a.shape)
        + a.tobytes()
    )


def write_dataset(d, n_train: int = 12, n_test: int = 5) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (d / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
        (d / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))


# --- loading -------------------------------------------------------------------------------------


@real_data
def test_real_files_shapes_and_ranges():
    ds = load_fashion_mnist(DEFAULT_DATA_DIR)
    assert ds.x_train.shape == (60000, 784) and ds.x_train.dtype == np.float32
    assert ds.x_test.shape == (10000, 784) and ds.x_test.dtype == np.float32
    assert ds.y_train.shape == (60000,) and ds.y_train.dtype == np.int64
    assert ds.y_test.shape == (10000,) and ds.y_test.dtype == np.int64
    for y in (ds.y_train, ds.y_test):
        assert set(np.unique(y)) == set(range(10))
    # Fashion-MNIST is balanced: 6000 / 1000 per class.
    assert (np.bincount(ds.y_train) == 6000).all() and (np.bincount(ds.y_test) == 1000).all()
    for x in (ds.x_train, ds.x_test):
        assert x.min() == 0.0 and x.max() == 1.0
    assert as_images(ds.x_test).shape == (10000, 1, 28, 28)
    assert np.shares_memory(as_images(ds.x_test), ds.x_test)


@real_data
def test_cached_and_read_only(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    a = load_fashion_mnist()
    assert load_fashion_mnist(str(DEFAULT_DATA_DIR) + "/") is a
    with pytest.raises(ValueError, match="read-only"):
        a.x_train[0, 0] = 1.0


def test_env_var_and_argument(tmp_path, monkeypatch):
    write_dataset(tmp_path)
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    ds = load_fashion_mnist()
    assert ds.x_train.shape == (12, 784) and ds.x_test.shape == (5, 784)
    assert ds.y_train.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "elsewhere"))
    assert load_fashion_mnist(tmp_path) is ds  # the argument wins over the env var


def test_missing_dir_names_the_package(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_fashion_mnist(tmp_path / "nope")
    assert isinstance(info.value, FileNotFoundError)
    msg = str(info.value)
    for needle in ("apt-get install dataset-fashion-mnist", "--data-dir", ENV_VAR, "nope"):
        assert needle in msg


def test_one_missing_file_is_named(tmp_path):
    write_dataset(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match="t10k-labels-idx1-ubyte.gz"):
        load_fashion_mnist(tmp_path)


def test_truncated_gzip(tmp_path):
    write_dataset(tmp_path)
    f = tmp_path / "train-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(IDXFormatError, match="train-images-idx3-ubyte.gz.*truncated or corrupt"):
        load_fashion_mnist(tmp_path)


def test_not_gzip(tmp_path):
    write_dataset(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"<html>404</html>")
    with pytest.raises(IDXFormatError, match="train-labels-idx1-ubyte.gz"):
        load_fashion_mnist(tmp_path)


def test_bad_magic(tmp_path):
    f = tmp_path / "x.gz"
    f.write_bytes(gzip.compress(b"\x12\x34\x08\x01" + bytes(8)))
    with pytest.raises(IDXFormatError, match="bad magic"):
        read_idx(f)


def test_truncated_payload_in_valid_gzip(tmp_path):
    f = tmp_path / "x.gz"
    f.write_bytes(gzip.compress(idx_bytes(np.zeros((10, 28, 28), np.uint8))[:-1]))
    with pytest.raises(IDXFormatError, match="truncated or corrupt"):
        read_idx(f)


def test_label_image_count_mismatch(tmp_path):
    write_dataset(tmp_path)
    labels = np.zeros(3, np.uint8)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    with pytest.raises(IDXFormatError, match="3 labels for 5 images"):
        load_fashion_mnist(tmp_path)


def test_read_idx_big_endian_types(tmp_path):
    a = np.arange(6, dtype=">i4").reshape(2, 3)
    f = tmp_path / "x"
    f.write_bytes(idx_bytes(a, code=0x0C))
    np.testing.assert_array_equal(read_idx(f), a)


# --- partitioning --------------------------------------------------------------------------------


def assert_disjoint_cover(parts, n_samples):
    joined = np.concatenate(parts)
    assert len(joined) == n_samples
    np.testing.assert_array_equal(np.sort(joined), np.arange(n_samples))


labels_and_n = st.integers(1, 300).flatmap(
    lambda m: st.tuples(
        st.lists(st.integers(0, 9), min_size=m, max_size=m).map(np.array), st.integers(1, m)
    )
)


@settings(max_examples=60, deadline=None)
@given(labels_and_n, st.integers(0, 2**32 - 1))
def test_iid_properties(yn, seed):
    y, n = yn
    parts = iid(y, n, seed)
    assert len(parts) == n
    assert_disjoint_cover(parts, len(y))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=60, deadline=None)
@given(labels_and_n, st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_shards_properties(yn, k, seed):
    y, n = yn
    if n * k > len(y):
        with pytest.raises(ValueError, match="shards"):
            shards(y, n, k, seed)
        return
    parts = shards(y, n, k, seed)
    assert len(parts) == n
    assert_disjoint_cover(parts, len(y))


@settings(max_examples=60, deadline=None)
@given(labels_and_n, st.sampled_from([0.01, 0.1, 1.0, 100.0]), st.integers(0, 2**32 - 1))
def test_dirichlet_properties(yn, alpha, seed):
    y, n = yn
    parts = dirichlet(y, n, alpha, seed)
    assert len(parts) == n
    assert all(len(p) > 0 for p in parts)
    assert_disjoint_cover(parts, len(y))


def test_shards_mcmahan_setup():
    # The paper: 100 workers, 200 shards of 300 -> each worker sees at most two classes.
    y = np.repeat(np.arange(10), 6000)
    parts = shards(y, 100, 2, seed=0)
    assert all(len(p) == 600 for p in parts)
    assert max(len(np.unique(y[p])) for p in parts) <= 2


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.3", "shards", "shards:3"])
def test_deterministic_for_a_seed(scheme):
    y = np.random.default_rng(1).integers(0, 10, 5000)
    a, b = partition(y, 7, scheme, seed=42), partition(y, 7, scheme, seed=42)
    c = partition(y, 7, scheme, seed=43)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))
    assert all(p.dtype == np.int64 for p in a)


def label_skew(y, parts):
    """Mean total-variation distance between each part's label mix and the global one."""
    k = y.max() + 1
    overall = np.bincount(y, minlength=k) / len(y)
    return np.mean([0.5 * np.abs(np.bincount(y[p], minlength=k) / len(p) - overall).sum()
                    for p in parts])  # fmt: skip


def test_dirichlet_skew_grows_as_alpha_drops():
    y = np.repeat(np.arange(10), 1000)
    skews = [label_skew(y, dirichlet(y, 10, alpha, seed=0)) for alpha in (1000, 10, 1, 0.1, 0.01)]
    assert skews == sorted(skews), skews
    assert skews[0] < 0.05 and skews[-1] > 0.7


def test_partition_dispatch():
    y = np.arange(100) % 10
    assert np.array_equal(partition(y, 4, " Dirichlet:0.5 ", 3)[0], dirichlet(y, 4, 0.5, 3)[0])
    assert np.array_equal(partition(y, 4, "dirichlet", 3, alpha=0.5)[0], dirichlet(y, 4, 0.5, 3)[0])
    assert np.array_equal(partition(y, 5, "shards:4", 3)[1], shards(y, 5, 4, 3)[1])
    for bad in ("random", "iid:2", "dirichlet", "dirichlet:x", "dirichlet:-1", "shards:0"):
        with pytest.raises(ValueError, match="partition scheme"):
            partition(y, 4, bad)


def test_bad_partition_arguments():
    with pytest.raises(ValueError, match="non-empty"):
        iid(np.arange(3), 4)
    with pytest.raises(ValueError, match="positive"):
        iid(np.arange(3), 0)
    with pytest.raises(ValueError, match="integer array"):
        iid(np.linspace(0, 1, 5), 2)


def test_parse_partition_spec():
    assert parse_partition_spec("3/6") == PartitionSpec(index=3, count=6)
    assert parse_partition_spec(" 1 / 1 ") == (1, 1)
    assert parse_partition_spec("6/6").index == 6
    for bad in ("0/6", "7/6", "3", "3/", "/6", "a/b", "-1/6", "3/6/9", "3.0/6", ""):
        with pytest.raises(ValueError, match="partition spec"):
            parse_partition_spec(bad)
