"""Runs that never mix, never lie, and never take the machine down (library level; the CLI side is in
test_cli.py): locks, unique folders, history from the checkpoint, the epoch named on interrupt, the
absurd-loss stop, bounded memory (chunked IWAE, sampling, grids), file permissions, results before figures."""
import json
import os
import threading

import numpy as np
import pytest

from minivae import VAE, VAEConfig
from minivae import figures
from minivae.checkpoint import load_checkpoint
from minivae.train import (RunLock, RunLocked, TrainingDiverged, TrainingInterrupted, TrainSettings, new_run_dir,
                           train)


def tiny(**kw):
    base = dict(n_train=256, n_test=64, epochs=2, batch_size=64, hidden=(16,), latent=2, figures=False)
    base.update(kw)
    return TrainSettings.from_recipe("default", **base)


def quiet_train(settings, out, **kw):
    lines = []
    hist = train(settings, out, progress=False, log=lines.append, **kw)
    return hist, lines


def history_epochs(out):
    return [r["epoch"] for r in json.loads((out / "history.json").read_text())]


# ------------------------------------------------------------------ one writer per folder
def test_a_locked_folder_refuses_a_second_writer_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    with RunLock(out):
        assert (out / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(RunLocked, match=rf"in use by another minivae run \(PID {os.getpid()}\)"):
            quiet_train(tiny(), out)
        with pytest.raises(RunLocked):
            RunLock(out).acquire()
    assert not (out / "checkpoint.npz").exists()
    quiet_train(tiny(epochs=1), out)                   # released: the folder is usable again
    assert load_checkpoint(out).epoch == 1


def test_the_lock_is_held_for_the_whole_run(tmp_path, monkeypatch):
    import minivae.train.loop as tr
    out = tmp_path / "run"
    seen = []
    real = tr.write_history

    def probe(folder, history):
        with pytest.raises(RunLocked):                 # every epoch, a second writer would be refused
            RunLock(out).acquire()
        seen.append(len(history))
        return real(folder, history)
    monkeypatch.setattr(tr, "write_history", probe)
    quiet_train(tiny(epochs=2), out)
    assert seen[:2] == [1, 2]


def test_default_run_folders_are_unique_even_in_the_same_microsecond(tmp_path, monkeypatch):
    import minivae.train.run_folder as tr
    monkeypatch.setattr(tr.time, "time", lambda: 1_767_000_000.25)
    made = []

    def make():
        made.append(new_run_dir(tmp_path / "runs", "default"))
    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == 8 and all(d.is_dir() for d in made)
    assert all("-250000" in d.name for d in made)              # microseconds in the name


def test_a_folder_with_results_is_not_overwritten_without_force(tmp_path):
    for name in ("results.json", "history.json"):
        out = tmp_path / name.split(".")[0]
        out.mkdir()
        (out / name).write_text('{"keep": true}')
        with pytest.raises(ValueError, match=rf"is not empty \(it holds {name}\).*force"):
            quiet_train(tiny(epochs=1), out)
        assert json.loads((out / name).read_text()) == {"keep": True}
        quiet_train(tiny(epochs=1), out, force=True)
        assert history_epochs(out) == [1]
    quiet_train(tiny(epochs=1), tmp_path / "empty_ok" / "new")   # a new folder needs no force


# ------------------------------------------------------------------ history and messages agree with the file
def test_history_agrees_with_the_checkpoint_after_an_interrupt(tmp_path, monkeypatch):
    import minivae.train.loop as tr
    out = tmp_path / "run"
    real, calls = tr.write_history, {"n": 0}

    def interrupted_once(folder, history):
        calls["n"] += 1
        if calls["n"] == 2:            # Ctrl-C right after the epoch-2 checkpoint was saved
            raise KeyboardInterrupt
        return real(folder, history)
    monkeypatch.setattr(tr, "write_history", interrupted_once)
    with pytest.raises(TrainingInterrupted) as info:
        quiet_train(tiny(epochs=3), out)
    c = load_checkpoint(out)
    assert c.epoch == 2 and "(epoch 2)" in str(info.value)
    assert history_epochs(out) == [1, 2] == [r["epoch"] for r in c.history]
    assert len((out / "history.csv").read_text().strip().splitlines()) == 1 + 2


def test_interrupt_during_the_save_names_the_epoch_in_the_file(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real, calls = np.savez, {"n": 0}

    def savez(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:            # Ctrl-C while epoch 2 is being saved
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(np, "savez", savez)
    with pytest.raises(TrainingInterrupted) as info:
        quiet_train(tiny(epochs=3), out)
    msg = str(info.value)
    assert "interrupted at epoch 2" in msg and "(epoch 1)" in msg, msg
    assert load_checkpoint(out).epoch == 1 and history_epochs(out) == [1]
    assert [p for p in os.listdir(out) if p.endswith(".tmp")] == []


def test_resume_removes_stale_temporary_files_and_says_so(tmp_path):
    out = tmp_path / "run"
    quiet_train(tiny(epochs=1), out)
    import itertools
    dead = next(pid for pid in itertools.count(4_000_000) if not os.path.exists(f"/proc/{pid}"))
    stale = out / f".checkpoint.npz.{dead}.k1ll3d_0.tmp"    # what SIGKILL during a save leaves
    stale.write_bytes(b"\0" * 4096)
    (out / "history.json").write_text('{"not": "a list"}')  # a corrupt history is rebuilt from the checkpoint
    _, lines = quiet_train(tiny(epochs=2), out, resume=True)
    assert not stale.exists()
    assert any("removed 1 temporary file" in line and stale.name in line for line in lines)
    assert history_epochs(out) == [1, 2]


# ------------------------------------------------------------------ absurd losses and settings
def test_an_absurd_finite_loss_stops_training_like_nan(tmp_path):
    import minivae.train as tr
    # a fixed-variance Gaussian with obs_var 1e-12: about 1e12 nats per image, finite but absurd
    s = tiny(likelihood="gaussian", binarize="none", obs_var=1e-12)
    with pytest.raises(TrainingDiverged, match=r"at epoch 1, step 1 \(above 1e\+06 nats per example"):
        quiet_train(s, tmp_path / "run")
    assert tr.MAX_LOSS == 1e6
    assert not (tmp_path / "run" / "checkpoint.npz").exists()


@pytest.mark.parametrize("field, value, fragment", [
    ("adam_eps", -1.0, "adam_eps must be positive"), ("adam_eps", 0.0, "adam_eps must be positive"),
    ("momentum", 1.5, "momentum must be in"), ("momentum", -0.1, "momentum must be in"),
    ("weight_decay", -1e-3, "weight_decay must be >= 0"), ("lr", float("nan"), "lr must be a finite"),
    ("lr", float("inf"), "lr must be a finite"), ("beta", float("nan"), "beta must be a finite"),
    ("clip_norm", float("inf"), "clip_norm must be a finite"), ("adam_eps", float("nan"), "adam_eps must be"),
])
def test_optimizer_settings_are_validated(field, value, fragment):
    with pytest.raises(ValueError, match=fragment):
        tiny(**{field: value}).validate()


@pytest.mark.parametrize("kw", [dict(hidden=(100_000_000,)), dict(latent=100_000_000)])
def test_a_model_that_cannot_fit_is_refused_before_allocating(kw, monkeypatch):
    monkeypatch.setattr(VAE, "__init__", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(ValueError, match="needs about .* of memory"):
        tiny(**kw).validate()


# ------------------------------------------------------------------ bounded memory
def test_chunked_iwae_equals_one_block_and_bounds_the_rows(monkeypatch):
    m = VAE(VAEConfig(x_dim=16, hidden=(8,), z_dim=3, dtype="float64"), rng=0)
    x = (np.random.default_rng(1).random((5, 16)) < 0.5).astype(np.float64)
    eps = np.random.default_rng(2).standard_normal((50, 5, 3))
    loss1, g1 = m.loss(x, eps=eps, iwae_k=50, beta=0.7)
    parts1 = dict(m.parts)
    rows = []
    real = m.decoder_forward
    m.decoder_forward = lambda z, y=None: (rows.append(len(z)), real(z, y))[1]
    m.IWAE_CHUNK_ELEMENTS = 16 * 5 * 4                # 4 samples of 5 rows per chunk
    loss2, g2 = m.loss(x, eps=eps, iwae_k=50, beta=0.7)
    assert max(rows) == 4 * 5 and len(rows) == 2 * 13  # two passes over ceil(50/4) chunks
    assert abs(float(loss1) - float(loss2)) < 1e-12
    assert np.max(np.abs(g1.flat - g2.flat)) < 1e-12 * max(1.0, np.max(np.abs(g1.flat)))
    assert abs(float(parts1["recon"]) - float(m.parts["recon"])) < 1e-10
    _, none = m.loss(x, eps=eps, iwae_k=50, backward=False)
    assert none is None


def test_chunked_sampling_is_the_same_stream_and_writes_an_npz(tmp_path):
    m = VAE(VAEConfig(x_dim=16, hidden=(8,), z_dim=3), rng=0)
    whole = np.asarray(m.sample(50, np.random.default_rng(7)))
    blocks = list(figures.sample_chunks(m, 50, np.random.default_rng(7), chunk=8))
    assert [len(b) for b in blocks] == [8] * 6 + [2]
    # the same z draws; the decodes agree up to float32 rounding (BLAS blocks by batch size)
    assert np.allclose(np.concatenate(blocks), whole, rtol=0, atol=1e-6)
    p = figures.save_samples_npz(m, tmp_path / "s.npz", np.random.default_rng(7), 50, chunk=8)
    with np.load(p) as z:
        assert z["x"].dtype == np.float32 and np.array_equal(z["x"], np.concatenate(blocks))


def test_pictures_and_grids_are_bounded(tmp_path):
    m = VAE(VAEConfig(x_dim=16, hidden=(8,), z_dim=2), rng=0)
    with pytest.raises(ValueError, match="at most 1024 samples"):
        figures.prior_samples(m, tmp_path / "s.png", np.random.default_rng(0), n=1025)
    with pytest.raises(ValueError, match="at most 100"):
        figures.manifold(m, tmp_path / "m.png", n=101)
    rows = []
    real = m.decode
    m.decode = lambda z: (rows.append(len(z)), real(z))[1]
    figures.manifold(m, tmp_path / "m.png", n=40)          # 1600 decodes, in chunks
    assert sum(rows) == 1600 and max(rows) <= figures.CHUNK


# ------------------------------------------------------------------ files: permissions, results first
def test_run_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        quiet_train(tiny(epochs=1), tmp_path / "run")
    finally:
        os.umask(old)
    for name in ("checkpoint.npz", "history.json", "history.csv", "results.json", "settings.json"):
        assert os.stat(tmp_path / "run" / name).st_mode & 0o777 == 0o640, name


def test_results_are_written_before_the_figures(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("a figure bug")
    monkeypatch.setattr(figures, "run_figures", broken)
    with pytest.raises(RuntimeError, match="a figure bug"):
        quiet_train(tiny(epochs=1, figures=True), tmp_path / "run")
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["test"]["n"] == 64


def test_figures_of_a_one_image_test_set(tmp_path):
    quiet_train(tiny(epochs=1, n_test=1, figures=True), tmp_path / "run")
    assert (tmp_path / "run" / "results.json").exists()
    assert (tmp_path / "run" / "figures" / "interpolation.png").read_bytes()[:4] == b"\x89PNG"


def test_json_is_strict(tmp_path):
    from minivae.train import json_text

    def no_constants(name):
        raise AssertionError(f"bare {name} in JSON")
    doc = json.loads(json_text({"a": float("nan"), "b": [np.float32("inf"), 1.5], "c": np.arange(2)}),
                     parse_constant=no_constants)
    assert doc == {"a": None, "b": [None, 1.5], "c": [0, 1]}
