"""The IDX reader, the embedded MNIST, other data folders and the preprocessing."""
import gzip
import struct

import numpy as np
import pytest

from minivae.data import (DataError, binarize, check_data, embedded_dir, load_mnist, minibatches, read_idx,
                          split_validation, static_binarize)
from minivae.train import load_split


def idx_bytes(a, dtype_code=0x08):
    a = np.asarray(a, dtype=np.uint8)
    return bytes([0, 0, dtype_code, a.ndim]) + struct.pack(">" + "I" * a.ndim, *a.shape) + a.tobytes()


def write_idx(path, a, gz=True, raw=None):
    data = raw if raw is not None else idx_bytes(a)
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def make_dataset(folder, n_train=40, n_test=20, side=28, seed=0):
    """A small IDX dataset in the MNIST layout (random images, labels 0..9)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, side, side)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return folder


def test_read_idx_roundtrip_gz_and_raw(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(read_idx(write_idx(tmp_path / "a.gz", a)), a)
    assert np.array_equal(read_idx(write_idx(tmp_path / "a.idx", a, gz=False)), a)


@pytest.mark.parametrize("case, fragment", [
    ("truncated", "truncated"),
    ("too_long", "too long"),
    ("bad_magic", "bad magic"),
    ("float_type", "not supported"),
    ("tiny", "truncated"),
    ("zero_dim", "dimension is zero"),
    ("ndim_255", "255 dimensions"),
    ("overflow", "header says 65536x65536x65536x65536 = 18446744073709551616 bytes"),
])
def test_corrupt_idx_gives_one_line_error_naming_the_file(tmp_path, case, fragment):
    good = idx_bytes(np.ones((3, 2, 2)))
    raw = {
        "truncated": good[:-3],
        "too_long": good + b"\x00",
        "bad_magic": b"\x01\x02" + good[2:],
        "float_type": bytes([0, 0, 0x0D]) + good[3:],
        "tiny": good[:2],
        "zero_dim": bytes([0, 0, 8, 1]) + struct.pack(">I", 0),
        "ndim_255": bytes([0, 0, 8, 255]) + struct.pack(">" + "I" * 255, *([1] * 255)) + b"\x07",
        # 65536^4 = 2^64 wraps to 0 in int64: a header whose dimension product overflows
        "overflow": bytes([0, 0, 8, 4]) + struct.pack(">IIII", 65536, 65536, 65536, 65536),
    }[case]
    path = write_idx(tmp_path / f"{case}-images.gz", None, raw=raw)
    with pytest.raises(DataError) as info:
        read_idx(path)
    msg = str(info.value)
    assert str(path) in msg and fragment in msg and "\n" not in msg


def test_corrupt_gzip_and_missing_file(tmp_path):
    p = tmp_path / "broken.gz"
    p.write_bytes(gzip.compress(idx_bytes(np.ones((50, 4))))[:-12])     # cut inside the gzip stream
    with pytest.raises(DataError, match="broken.gz"):
        read_idx(p)
    with pytest.raises(DataError, match="not found"):
        read_idx(tmp_path / "nope.gz")


def test_embedded_mnist_is_the_full_dataset():
    x, y = load_mnist("test", embedded_dir())
    assert x.shape == (10000, 784) and x.dtype == np.float32 and y.dtype == np.int64
    assert x.min() == 0.0 and x.max() == 1.0
    assert np.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    xt, yt = load_mnist("train", embedded_dir())
    assert xt.shape == (60000, 784)
    assert np.bincount(yt).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert abs(xt.mean() * 255 - 33.318) < 1e-3


def test_data_dir_and_env_load_another_idx_dataset(tmp_path, monkeypatch):
    d = make_dataset(tmp_path / "fake", n_train=30, n_test=12)
    x, y = load_mnist("train", d)
    assert x.shape == (30, 784)
    monkeypatch.setenv("MINIVAE_DATA", str(d))
    x2, _ = load_mnist("test")
    assert x2.shape == (12, 784)
    with pytest.raises(DataError, match="data directory not found"):
        load_mnist("train", tmp_path / "missing")


def test_load_split_reads_npz_folders(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "train.npz", x=rng.normal(size=(10, 5)), y=np.arange(10))
    x, y = load_split("train", tmp_path)
    assert x.shape == (10, 5) and x.dtype == np.float32 and y.tolist() == list(range(10))


@pytest.mark.parametrize("x", [np.ones((4, 3), dtype=np.complex128), np.array([["a", "b"], ["c", "d"]])])
def test_npz_data_must_be_real_numbers(tmp_path, x):
    np.savez(tmp_path / "train.npz", x=x, y=np.arange(len(x)))
    with pytest.raises(DataError, match=rf"train.npz: x has dtype {x.dtype}; expected real numbers"):
        load_split("train", tmp_path)


def test_fingerprint_hashes_the_whole_files(tmp_path):
    import hashlib

    from minivae.data import fingerprint
    folder = make_dataset(tmp_path / "d")
    fp = fingerprint(folder)
    assert fp["path"] == str(folder.resolve())
    assert set(fp["files"]) == {"train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                                "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"}
    for name, (size, sha) in fp["files"].items():
        data = (folder / name).read_bytes()
        assert size == len(data) and sha == hashlib.sha256(data).hexdigest()
    emb = fingerprint(embedded_dir())
    assert emb["files"]["train-images-idx3-ubyte.gz"][1] == \
        "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971"    # the shipped file's SHA-256
    np.savez(folder / "test.npz", x=np.zeros((2, 4)))                       # an npz replaces the test IDX files
    assert set(fingerprint(folder)["files"]) == {"train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                                                 "test.npz"}


def test_label_image_count_mismatch(tmp_path):
    d = make_dataset(tmp_path / "bad", n_train=10, n_test=5)
    write_idx(d / "train-labels-idx1-ubyte.gz", np.zeros(9))
    with pytest.raises(DataError, match="10 images but 9 labels"):
        load_mnist("train", d)


def test_check_data():
    check_data(np.array([[0.0, 1.0]]), "bernoulli")
    with pytest.raises(DataError, match="outside"):
        check_data(np.array([[0.0, 1.5]]), "bernoulli")
    check_data(np.array([[0.0, 1.5]]), "gaussian")
    with pytest.raises(DataError, match="NaN"):
        check_data(np.array([[0.0, np.nan]]), "gaussian")


def test_binarize_dynamic_and_static():
    x = np.full((200, 50), 0.3, dtype=np.float32)
    rng = np.random.default_rng(0)
    a, b = binarize(x, rng), binarize(x, rng)
    assert a.dtype == np.float32 and set(np.unique(a)) <= {0.0, 1.0}
    assert not np.array_equal(a, b)                        # re-sampled each call
    assert abs(a.mean() - 0.3) < 0.02                      # E[x_bin] = pixel
    assert np.array_equal(static_binarize(x, 7), static_binarize(x, 7))
    edge = np.array([[0.0, 1.0]] * 100, dtype=np.float32)
    assert np.array_equal(binarize(edge, rng), edge)       # 0 and 1 stay put


def test_split_validation_and_minibatches():
    x, y = np.arange(20.0).reshape(10, 2), np.arange(10)
    xt, yt, xv, yv = split_validation(x, y, 3, seed=1)
    assert len(xv) == 3 and len(xt) == 7 and sorted(np.concatenate([yt, yv]).tolist()) == list(range(10))
    assert np.array_equal(xt[:, 0] / 2, yt)                # rows stay paired with labels
    b1 = minibatches(10, 4, np.random.default_rng(0))
    b2 = minibatches(10, 4, np.random.default_rng(0))
    assert [len(b) for b in b1] == [4, 4, 2]
    assert all(np.array_equal(p, q) for p, q in zip(b1, b2))
    assert sorted(np.concatenate(b1).tolist()) == list(range(10))


def test_image_shape_from_the_header_or_the_npz(tmp_path, monkeypatch):
    from minivae.data import image_shape
    assert image_shape(embedded_dir()) == (1, 28, 28) == image_shape(embedded_dir(), "test")
    monkeypatch.setenv("MINIVAE_DATA", str(make_dataset(tmp_path / "idx", side=5)))
    assert image_shape() == (1, 5, 5)                                  # the default folder: $MINIVAE_DATA
    rect = tmp_path / "rect"
    rect.mkdir()
    rng = np.random.default_rng(0)
    write_idx(rect / "t10k-images-idx3-ubyte", rng.integers(0, 256, (3, 4, 6)), gz=False)   # raw, not .gz
    assert image_shape(rect, "test") == (1, 4, 6)
    write_idx(rect / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (3, 7, 2)))
    assert image_shape(rect) == (1, 7, 2)                              # the split's own file
    flat = tmp_path / "flat"
    flat.mkdir()
    write_idx(flat / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (3, 12)))           # (N, D): not images
    with pytest.raises(DataError, match="3 dimensions"):
        image_shape(flat)
    write_idx(flat / "t10k-images-idx3-ubyte.gz", None, raw=b"\0\0\x08")                   # a truncated header
    with pytest.raises(DataError, match="3 dimensions"):
        image_shape(flat, "test")
    with pytest.raises(DataError, match="cannot read"):
        image_shape(tmp_path / "nothing-here")
    npz = tmp_path / "npz"
    npz.mkdir()
    np.savez(npz / "train.npz", x=np.zeros((2, 3, 5)), y=np.zeros(2))
    np.savez(npz / "test.npz", x=np.zeros((2, 15)), y=np.zeros(2))
    assert image_shape(npz) == (1, 3, 5) and image_shape(npz, "test") is None
    (npz / "train.npz").write_bytes(b"not an archive")
    with pytest.raises(DataError, match="cannot read"):
        image_shape(npz)


def test_read_idx_header_boundaries_and_the_raw_fallback(tmp_path):
    a = np.arange(6, dtype=np.uint8).reshape(2, 3)
    write_idx(tmp_path / "r", a, gz=False)
    assert np.array_equal(read_idx(tmp_path / "r.gz"), a)                  # r.gz missing: the raw file r
    with pytest.raises(DataError, match="file not found"):
        read_idx(tmp_path / "r.idx")                                       # only a missing .gz falls back
    with pytest.raises(DataError, match=r"only 3 bytes"):
        read_idx(write_idx(tmp_path / "h3", None, gz=False, raw=b"\0\0\x08"))
    with pytest.raises(DataError, match="truncated header"):
        read_idx(write_idx(tmp_path / "h4", None, gz=False, raw=b"\0\0\x08\x01"))   # 4 bytes: the magic only
    sixteen = bytes([0, 0, 8, 16]) + struct.pack(">16I", *([1] * 16)) + b"\x07"     # 16 dimensions: allowed
    assert read_idx(write_idx(tmp_path / "d16", None, gz=False, raw=sixteen)).shape == (1,) * 16
    with pytest.raises(DataError, match="17 dimensions"):
        read_idx(write_idx(tmp_path / "d17", None, gz=False, raw=bytes([0, 0, 8, 17]) + b"\0" * 100))
    with pytest.raises(DataError, match="truncated: header says 2x3 = 6 bytes, file has 5"):
        read_idx(write_idx(tmp_path / "t", None, gz=False, raw=idx_bytes(a)[:-1]))
    with pytest.raises(DataError, match="too long: header says 2x3 = 6 bytes, file has 7"):
        read_idx(write_idx(tmp_path / "l", None, gz=False, raw=idx_bytes(a) + b"\0"))
    huge = bytes([0, 0, 8, 1]) + struct.pack(">I", 2 ** 31) + b"\0" * 4         # dimensions are unsigned
    with pytest.raises(DataError, match="truncated: header says 2147483648 = 2147483648 bytes"):
        read_idx(write_idx(tmp_path / "u", None, gz=False, raw=huge))


def test_preprocessing_defaults_and_boundaries(tmp_path):
    with pytest.raises(DataError, match="outside"):
        check_data(np.array([[1.5]]))                                     # Bernoulli is the default
    check_data(np.array([[1.5]]), likelihood="gaussian")
    x64 = np.random.default_rng(0).random((4, 5))
    b = binarize(x64, np.random.default_rng(3))
    assert b.dtype == np.float64
    assert np.array_equal(b, (np.random.default_rng(3).random((4, 5)) < x64).astype(np.float64))   # float64 draws
    x32 = x64.astype(np.float32)
    assert np.array_equal(static_binarize(x32), binarize(x32, np.random.default_rng(0)))            # seed 0
    x, y = np.arange(10.0)[:, None], np.arange(10)
    xt, yt, xv, yv = split_validation(x, y, 3)
    perm = np.random.default_rng(0).permutation(10)
    assert np.array_equal(yv, perm[:3]) and np.array_equal(yt, perm[3:]) and np.array_equal(xv[:, 0], yv)
    assert len(split_validation(x, y, 0)[2]) == 0                          # no validation set is allowed
    with pytest.raises(ValueError, match="validation size"):
        split_validation(x, y, 10)
    assert [list(b) for b in minibatches(5, 2, np.random.default_rng(0), shuffle=False)] == [[0, 1], [2, 3], [4]]
    assert len(minibatches(3, 1, np.random.default_rng(0))) == 3           # batch size 1 is allowed
    with pytest.raises(ValueError, match="batch size"):
        minibatches(3, 0, np.random.default_rng(0))
    small = make_dataset(tmp_path / "s", n_train=7, n_test=3, side=4)
    assert load_mnist(data_dir=small)[0].shape == (7, 16)                  # the train split by default


def test_raw_files_fingerprint_cache_and_message_name(tmp_path):
    import os

    from minivae.data import fingerprint, image_shape
    d = make_dataset(tmp_path / "raw", n_train=6, n_test=4, side=3)
    for gz in d.glob("*.gz"):                                    # the same folder, un-gzipped
        with gzip.open(gz, "rb") as f:
            gz.with_suffix("").write_bytes(f.read())
        gz.unlink()
    x, y = load_mnist("train", d)
    assert x.shape == (6, 9) and y.shape == (6,)
    write_idx(d / "t10k-images-idx3-ubyte.gz", np.zeros((4, 5, 5)))        # both forms: the .gz file wins
    assert image_shape(d, "test") == (1, 5, 5) and load_mnist("test", d)[0].shape == (4, 25)
    assert "t10k-images-idx3-ubyte.gz" in fingerprint(d)["files"]           # and is the file the run records
    assert "t10k-labels-idx1-ubyte" in fingerprint(d)["files"]              # (a raw file alone is recorded too)
    # the hash cache is keyed by path, size and mtime: a rewrite that keeps either of them is still seen
    lab = d / "t10k-labels-idx1-ubyte"
    sha = lambda: fingerprint(d)["files"][lab.name][1]              # noqa: E731
    first, st = sha(), os.stat(lab)
    write_idx(lab, np.array([1, 1, 1, 1]), gz=False)                 # the same size, a later mtime
    os.utime(lab, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    second = sha()
    assert second != first
    st = os.stat(lab)
    write_idx(lab, np.array([2, 2, 2, 2, 2]), gz=False)              # another size, the same mtime
    os.utime(lab, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert sha() not in (first, second)
    with pytest.raises(DataError, match=r"^data: contains NaN"):
        check_data(np.array([[np.nan]]))                          # the default name in the message


def test_load_mnist_gives_float32_pixels_over_255_and_int64_labels(tmp_path):
    """Every byte value b becomes b / 255 as a float32 (0 -> 0.0, 255 -> exactly 1.0); labels are int64."""
    d = tmp_path / "bytes"
    d.mkdir()
    write_idx(d / "train-images-idx3-ubyte.gz", np.arange(256).reshape(4, 8, 8))      # each byte value once
    write_idx(d / "train-labels-idx1-ubyte.gz", np.array([0, 9, 3, 7]))
    x, y = load_mnist("train", d)
    assert x.dtype == np.float32 and x.shape == (4, 64)
    assert x[0, 0] == 0.0 and x[3, 63] == 1.0
    # a float32 division is correctly rounded, so it equals the float64 quotient rounded to float32
    assert np.array_equal(x.ravel(), (np.arange(256) / 255.0).astype(np.float32))
    assert y.dtype == np.int64 and y.tolist() == [0, 9, 3, 7]
