"""MNIST-style data: the IDX reader, the embedded MNIST, and preprocessing.

The four standard files ship inside the package (``minivae/data/*.gz``), so a
fresh clone trains on the real 60k/10k MNIST with no network.  Any dataset in
the same layout (Fashion-MNIST, for example) loads from a folder given as
``data_dir`` or the environment variable ``MINIVAE_DATA``.

IDX format (LeCun et al.): a 4-byte magic ``0x00 0x00 <type> <ndim>``, then
``ndim`` big-endian uint32 dimensions, then the data.  We read type 0x08
(unsigned byte) only, and check the magic, the dimensions and the byte count.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import struct
from pathlib import Path

import numpy as np

from .backend import get_array_module
from .likelihoods import get_likelihood

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
BINARIZE = ("none", "dynamic", "static")
MAX_IDX_DIMS = 16          # MNIST-style files have 1 to 4; a header claiming more is corrupt


class DataError(ValueError):
    """A data file is missing, truncated or corrupt, or data is out of range."""


def embedded_dir():
    """The folder of the MNIST files shipped with the package."""
    return Path(__file__).resolve().parent / "data"


def default_data_dir():
    """``$MINIVAE_DATA`` if set, else the embedded MNIST."""
    env = os.environ.get("MINIVAE_DATA", "").strip()
    return Path(env) if env else embedded_dir()


def _open(path):
    path = Path(path)
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return open(path, "rb")


def read_idx(path):
    """Read an IDX file (gzip or raw) of unsigned bytes into a NumPy array.

    Raises :class:`DataError` naming the file when it is missing, not IDX,
    not uint8, truncated, or longer than its header says.
    """
    path = Path(path)
    if not path.exists():
        # also try the un-gzipped name
        alt = path.with_suffix("") if path.suffix == ".gz" else None
        if alt is not None and alt.exists():
            path = alt
        else:
            raise DataError(f"{path}: file not found")
    try:
        with _open(path) as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    if len(raw) < 4:
        raise DataError(f"{path}: truncated (only {len(raw)} bytes; an IDX header needs at least 4)")
    zero, dtype_code, ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or ndim == 0:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    if dtype_code != 0x08:
        raise DataError(f"{path}: IDX data type 0x{dtype_code:02x} is not supported (only 0x08, unsigned byte)")
    if ndim > MAX_IDX_DIMS:
        raise DataError(f"{path}: corrupt IDX header: {ndim} dimensions (at most {MAX_IDX_DIMS} are supported)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header")
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    if any(d == 0 for d in dims):
        raise DataError(f"{path}: a dimension is zero {dims}")
    expected = math.prod(dims)            # exact Python integer: a corrupt header cannot overflow it
    got = len(raw) - header
    if got != expected:
        what = "truncated" if got < expected else "too long"
        raise DataError(f"{path}: {what}: header says {'x'.join(map(str, dims))} = {expected} bytes, file has {got}")
    try:
        return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)
    except ValueError as exc:
        raise DataError(f"{path}: cannot shape the data as {'x'.join(map(str, dims))} ({exc})") from None


def split_files(split, data_dir):
    """The files a split is read from: ``<split>.npz`` if present, else the two IDX files (gzip or raw)."""
    d = Path(data_dir)
    npz = d / f"{split}.npz"
    if npz.exists():
        return [npz]
    out = []
    for name in FILES[split]:
        p = d / name
        out.append(p if p.exists() or not p.with_suffix("").exists() else p.with_suffix(""))
    return out


@functools.lru_cache(maxsize=16)
def _sha256(path, size, mtime_ns):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(data_dir):
    """Where a run's data came from: ``{"path": resolved folder, "files": {name: [bytes, sha256]}}``.

    The SHA-256 covers the whole of every file the train and test splits are read
    from (the digest is cached per path, size and modification time).  Two folders hold the same data
    exactly when their ``files`` are equal, whatever their paths.
    """
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"{d}: data directory not found")
    files = {}
    for split in FILES:
        for p in split_files(split, d):
            try:
                st = p.stat()
                files[p.name] = [int(st.st_size), _sha256(str(p.resolve()), st.st_size, st.st_mtime_ns)]
            except OSError as exc:
                raise DataError(f"{p}: cannot read ({exc.strerror or exc})") from None
    return {"path": str(d.resolve()), "files": files}


def load_mnist(split="train", data_dir=None):
    """Images scaled to [0, 1] as float32 (N, 784), and labels int64 (N,).

    ``split`` is "train" (60000 for MNIST) or "test" (10000).  ``data_dir``
    defaults to :func:`default_data_dir`.
    """
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d = Path(data_dir) if data_dir is not None else default_data_dir()
    if not d.is_dir():
        raise DataError(f"{d}: data directory not found")
    img_name, lab_name = FILES[split]
    images = read_idx(d / img_name)
    labels = read_idx(d / lab_name)
    if images.ndim != 3:
        raise DataError(f"{d / img_name}: expected 3 dimensions (N, rows, cols), got {images.ndim}")
    if labels.ndim != 1:
        raise DataError(f"{d / lab_name}: expected 1 dimension (N,), got {labels.ndim}")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{d}: {images.shape[0]} images but {labels.shape[0]} labels in the {split} split")
    x = images.reshape(images.shape[0], -1).astype(np.float32) / np.float32(255.0)
    return x, labels.astype(np.int64)


def image_shape(data_dir=None, split="train"):
    """(1, H, W) of the images in a data folder, or None when it holds flat rows.

    Read from the IDX header (N, H, W) of the ``split`` images, or from the shape of the ``x`` array of
    ``<split>.npz`` when that is (N, H, W).  The images themselves are not read.
    """
    d = Path(data_dir) if data_dir is not None else default_data_dir()
    npz = d / f"{split}.npz"
    if npz.exists():
        try:
            with np.load(npz, allow_pickle=False) as z:
                shape = z["x"].shape
        except (OSError, ValueError, KeyError, EOFError) as exc:
            raise DataError(f"{npz}: cannot read ({type(exc).__name__}: {exc})") from None
        return (1, *map(int, shape[1:])) if len(shape) == 3 else None
    path = d / FILES[split][0]
    if not path.exists() and path.suffix == ".gz" and path.with_suffix("").exists():
        path = path.with_suffix("")
    try:
        with _open(path) as f:
            head = f.read(16)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    if len(head) < 16 or head[3] != 3:
        raise DataError(f"{path}: expected an IDX file of 3 dimensions (N, rows, cols)")
    return (1, *struct.unpack(">II", head[8:16]))


def check_data(x, likelihood="bernoulli", name="data"):
    """Raise :class:`DataError` if x has NaN/inf, or leaves [0, 1] under a likelihood of such data (Bernoulli)."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise DataError(f"{name}: expected a 2-D array (N, D), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise DataError(f"{name}: contains NaN or inf")
    if get_likelihood(likelihood).unit_interval and x.size and (x.min() < 0 or x.max() > 1):
        raise DataError(f"{name}: values outside [0, 1] (min {x.min():g}, max {x.max():g}); "
                        f"the {likelihood} likelihood needs pixels in [0, 1]")
    return x


def binarize(x, rng):
    """One Bernoulli draw per pixel: x_bin ~ Bernoulli(x).  Same dtype and backend as x.

    ``rng`` is a NumPy Generator: the uniform draws are made on the host (so a run draws the same numbers
    on any backend) and compared with x where x lives."""
    u = rng.random(x.shape, dtype=np.float32 if x.dtype == np.float32 else np.float64)
    return (get_array_module(x).asarray(u) < x).astype(x.dtype)


def static_binarize(x, seed=0):
    """A fixed binarization (the same for every epoch and run with this seed)."""
    return binarize(x, np.random.default_rng(seed))


def split_validation(x, y, n_valid, seed=0):
    """Hold out ``n_valid`` random rows: returns (x_train, y_train, x_valid, y_valid)."""
    if not 0 <= n_valid < len(x):
        raise ValueError(f"validation size must be in [0, {len(x)}), got {n_valid}")
    perm = np.random.default_rng(seed).permutation(len(x))
    va, tr = perm[:n_valid], perm[n_valid:]
    return x[tr], y[tr], x[va], y[va]


def minibatches(n, batch_size, rng, shuffle=True):
    """Index arrays of the minibatches of one epoch (the last may be short)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    order = rng.permutation(n) if shuffle else np.arange(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]
