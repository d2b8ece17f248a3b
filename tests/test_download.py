"""The SHA-256-checked download, against a local HTTP server on 127.0.0.1."""
import functools
import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import threading

import pytest

from minivae import download as dl
from minivae.data import embedded_dir, read_idx

NAME = "t10k-labels-idx1-ubyte.gz"


@pytest.fixture
def server(tmp_path):
    """Serve tmp_path/www on 127.0.0.1 (a free port); yields (folder, base URL)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(QuietHandler, directory=str(www))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield www, f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_good_file_is_verified_and_written(server, tmp_path):
    www, url = server
    shutil.copy(embedded_dir() / NAME, www / NAME)
    cache = tmp_path / "cache"
    folder = dl.download("mnist", cache, base_url=url, files=[NAME])
    assert folder == cache / "mnist"
    assert os.listdir(folder) == [NAME]                      # no temp file left
    got = hashlib.sha256((folder / NAME).read_bytes()).hexdigest()
    assert got in dl.DATASETS["mnist"]["files"][NAME]
    assert read_idx(folder / NAME).shape == (10000,)
    # a second call finds the verified file and does not fetch again
    (www / NAME).unlink()
    dl.download("mnist", cache, base_url=url, files=[NAME])
    assert (folder / NAME).exists()


def test_corrupted_file_leaves_nothing_behind(server, tmp_path):
    www, url = server
    data = bytearray((embedded_dir() / NAME).read_bytes())
    data[100] ^= 0xFF
    (www / NAME).write_bytes(bytes(data))
    cache = tmp_path / "cache"
    with pytest.raises(dl.DownloadError, match="SHA-256 mismatch"):
        dl.download("mnist", cache, base_url=url, files=[NAME])
    assert list((cache / "mnist").iterdir()) == []


def test_corrupted_download_keeps_a_good_existing_file_untouched(server, tmp_path):
    www, url = server
    cache = tmp_path / "cache" / "mnist"
    cache.mkdir(parents=True)
    # an existing file that fails verification is replaced only by a verified one
    (cache / NAME).write_bytes(b"stale")
    (www / NAME).write_bytes(b"also wrong")
    with pytest.raises(dl.DownloadError):
        dl.download("mnist", cache.parent, base_url=url, files=[NAME])
    assert os.listdir(cache) == [NAME] and (cache / NAME).read_bytes() == b"stale"


def test_http_error_and_unknown_names(server, tmp_path):
    _, url = server
    with pytest.raises(dl.DownloadError, match="HTTP 404"):
        dl.download("mnist", tmp_path / "c", base_url=url, files=[NAME])
    assert list((tmp_path / "c" / "mnist").iterdir()) == []
    with pytest.raises(dl.DownloadError, match="unknown dataset"):
        dl.download("cifar", tmp_path / "c")
    with pytest.raises(dl.DownloadError, match="no file"):
        dl.download("mnist", tmp_path / "c", files=["x.gz"])


def test_registry_matches_the_shipped_files():
    for name, accepted in dl.DATASETS["mnist"]["files"].items():
        assert dl.sha256_file(embedded_dir() / name) in accepted


def test_cli_download_good_and_bad(server, tmp_path):
    www, url = server
    for name in dl.DATASETS["mnist"]["files"]:
        shutil.copy(embedded_dir() / name, www / name)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "minivae", "download", "mnist", "--cache", str(tmp_path / "c"),
                        "--url", url], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / "c" / "mnist")) == sorted(dl.DATASETS["mnist"]["files"])
    (www / NAME).write_bytes(b"corrupt")
    r = subprocess.run([sys.executable, "-m", "minivae", "download", "mnist", "--cache", str(tmp_path / "d"),
                        "--url", url], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert r.stderr.startswith("minivae: error:") and "SHA-256 mismatch" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert NAME not in os.listdir(tmp_path / "d" / "mnist")


def test_downloads_go_through_the_one_atomic_writer(server, tmp_path, monkeypatch):
    """fetch writes with atomic.atomic_write (the package's only atomic writer): its temp-file
    naming and cleanup, and the permissions the umask gives."""
    from minivae import atomic as checkpoint
    www, url = server
    shutil.copy(embedded_dir() / NAME, www / NAME)
    calls = []
    real = checkpoint.atomic_write
    monkeypatch.setattr(checkpoint, "atomic_write", lambda path, *a, **k: (calls.append(path), real(path, *a, **k))[1])
    old = os.umask(0o022)
    try:
        folder = dl.download("mnist", tmp_path / "cache", base_url=url, files=[NAME])
    finally:
        os.umask(old)
    assert calls == [folder / NAME]
    assert os.stat(folder / NAME).st_mode & 0o777 == 0o644
