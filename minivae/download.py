"""Download a named IDX dataset into a cache, verified by SHA-256.

    python -m minivae download fashion-mnist              # into ~/.cache/minivae/fashion-mnist
    python -m minivae train --data-dir ~/.cache/minivae/fashion-mnist

Every file is streamed into a temporary file *in the cache folder*, hashed
while it is written, and renamed onto its final name (an atomic
``os.replace``) only when its SHA-256 is one of the accepted values.  On a
mismatch, an HTTP error or an interruption the temporary file is deleted, so
the cache never holds a partial or unverified file.

MNIST is already shipped with the package (``minivae/data``), so
``download mnist`` is only needed for a separate copy.  The shipped files
were recompressed (``gzip -9 -n``), so their bytes differ from the upstream
mirrors'; the registry accepts both the upstream SHA-256 and ours.
"""
from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

# name -> {"url": base URL, "files": {file name: (accepted SHA-256 values)}}
DATASETS = {
    "mnist": {
        "url": "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "files": {
            # (upstream gzip as served by the mirror, the recompressed copy shipped in minivae/data)
            "train-images-idx3-ubyte.gz": ("440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                                           "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971"),
            "train-labels-idx1-ubyte.gz": ("3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                                           "1787548bbe0bff1ec2ecdc0ef292b02df999e2d1a6002d27500982c652b17203"),
            "t10k-images-idx3-ubyte.gz": ("8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                                          "1a1a05eab793c14bb050b398624a11b0ffd1a2953baed553b1b9bd079e2a20be"),
            "t10k-labels-idx1-ubyte.gz": ("f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
                                          "b91679a0acfe4ba0e50a2437a903084cba1f5f92592b016a25a7dfd00455798b"),
        },
    },
    "fashion-mnist": {
        "url": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "files": {
            "train-images-idx3-ubyte.gz": ("3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",),
            "train-labels-idx1-ubyte.gz": ("a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",),
            "t10k-images-idx3-ubyte.gz": ("346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",),
            "t10k-labels-idx1-ubyte.gz": ("67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",),
        },
    },
}

CHUNK = 1 << 16


class DownloadError(RuntimeError):
    """A download failed or its SHA-256 did not match; nothing was left in the cache."""


def default_cache_dir():
    """``$MINIVAE_CACHE`` if set, else ``~/.cache/minivae``."""
    env = os.environ.get("MINIVAE_CACHE", "").strip()
    return Path(env) if env else Path.home() / ".cache" / "minivae"


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def fetch(url, dest, sha256, timeout=30.0):
    """Stream ``url`` to ``dest`` atomically, accepting it only if its SHA-256 is in ``sha256``.

    ``sha256`` is one hex digest or a tuple of accepted ones.  Returns ``dest``.  The
    temporary file, its removal on any failure and the final rename are the package's one
    atomic writer, :func:`minivae.atomic.atomic_write`.
    """
    from .atomic import atomic_write
    dest = Path(dest)
    accepted = (sha256,) if isinstance(sha256, str) else tuple(sha256)

    def fail(exc):
        if isinstance(exc, urllib.error.HTTPError):
            return DownloadError(f"{url}: HTTP {exc.code} {exc.reason}")
        return DownloadError(f"{url}: download failed ({getattr(exc, 'reason', exc)})")

    def write(out):
        h = hashlib.sha256()
        try:
            resp = urllib.request.urlopen(url, timeout=timeout)
        except (urllib.error.URLError, OSError) as exc:
            raise fail(exc) from None
        with resp:
            while True:
                try:
                    block = resp.read(CHUNK)
                except (urllib.error.URLError, OSError) as exc:
                    raise fail(exc) from None
                if not block:
                    break
                h.update(block)
                out.write(block)       # a failed write (full disk) is the atomic writer's, naming the file
        got = h.hexdigest()
        if got not in accepted:             # raising here makes atomic_write delete the temporary file
            raise DownloadError(f"{url}: SHA-256 mismatch (got {got}, expected {' or '.join(accepted)}); "
                                f"nothing was written to {dest.parent}")

    return atomic_write(dest, write)


def download(name, cache_dir=None, base_url=None, files=None, progress=None):
    """Download dataset ``name`` into ``cache_dir/name`` and return that folder.

    ``base_url`` replaces the registry's base URL (a mirror, or a local test
    server); ``files`` restricts the download to some of the file names.
    Files already present with an accepted SHA-256 are kept.  ``progress`` is
    an optional callable given one line of text per file.
    """
    try:
        entry = DATASETS[name]
    except KeyError:
        raise DownloadError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}") from None
    folder = Path(cache_dir if cache_dir is not None else default_cache_dir()) / name
    base = base_url or entry["url"]
    if not base.endswith("/"):
        base += "/"
    names = list(entry["files"]) if files is None else list(files)
    for fname in names:
        if fname not in entry["files"]:
            raise DownloadError(f"dataset {name!r} has no file {fname!r}")
        accepted = entry["files"][fname]
        dest = folder / fname
        if dest.exists() and sha256_file(dest) in accepted:
            if progress:
                progress(f"{dest}: already present, SHA-256 ok")
            continue
        fetch(base + fname, dest, accepted)
        if progress:
            progress(f"{dest}: downloaded, SHA-256 ok")
    return folder
