"""Checkpoints: round trip without pickle, atomic writes, clear errors."""
import json
import os

import numpy as np
import pytest

from minivae import VAE, VAEConfig, Adam, SGD
from minivae import checkpoint as ck


def trained(seed=0):
    model = VAE(VAEConfig(x_dim=16, hidden=(8,), z_dim=3), rng=seed)
    opt = Adam(lr=1e-2)
    x = (np.random.default_rng(seed).random((10, 16)) < 0.5).astype(np.float32)
    for _ in range(3):
        _, g = model.loss(x)
        opt.step(model.params, g)
    return model, opt


def test_round_trip(tmp_path):
    model, opt = trained()
    rngs = {"shuffle": np.random.default_rng(5), "eps": model.rng}
    rngs["shuffle"].random(3)
    path = ck.save_checkpoint(tmp_path / "c.npz", model, opt, rngs, {"lr": 0.01}, epoch=2,
                              history=[{"epoch": 1, "x": 2.5}, {"epoch": 2, "x": 2.0}])
    with np.load(path, allow_pickle=False) as z:                # no object arrays anywhere
        assert "param/enc.0.W" in z.files and "opt/0.m" in z.files
    c = ck.load_checkpoint(path)
    assert c.epoch == 2 and c.settings == {"lr": 0.01} and c.history == [{"epoch": 1, "x": 2.5}, {"epoch": 2, "x": 2.0}]
    assert c.config == model.config
    m2 = c.build_model()
    for k in model.params:
        assert np.array_equal(m2.params[k], model.params[k])
    o2 = c.load_optimizer(Adam(lr=1.0), m2.params)
    assert o2.t == opt.t == 3 and o2.lr == 0.01
    assert np.array_equal(o2.state[0]["v"], opt.state[0]["v"])
    fresh = {"shuffle": np.random.default_rng(0), "eps": np.random.default_rng(0)}
    ck.restore_rngs(fresh, c.rng)
    assert np.array_equal(fresh["shuffle"].random(4), rngs["shuffle"].random(4))
    assert np.array_equal(fresh["eps"].random(4), model.rng.random(4))
    with pytest.raises(ck.CheckpointError, match="optimizer 'adam'"):
        c.load_optimizer(SGD(lr=0.1), m2.params)


def test_folder_argument(tmp_path):
    model, opt = trained()
    ck.save_checkpoint(tmp_path / "checkpoint.npz", model, opt)
    assert ck.load_checkpoint(tmp_path).path == tmp_path / "checkpoint.npz"


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = trained()
    path = ck.save_checkpoint(tmp_path / "checkpoint.npz", model, opt, epoch=1, history=[{"epoch": 1}])
    before = path.read_bytes()

    def broken_savez(f, **arrays):
        f.write(b"half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(path, model, opt, epoch=2, history=[{"epoch": 1}, {"epoch": 2}])
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["checkpoint.npz"]           # the temp file is gone
    assert ck.load_checkpoint(path).epoch == 1


@pytest.mark.parametrize("content, fragment", [
    (b"", "not a checkpoint \\(not a .npz file\\)"),
    (bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "not a checkpoint \\(not a .npz file\\)"),
    (b"\x80\x04K\x01.", "not a checkpoint \\(not a .npz file\\)"),           # a pickle is not a checkpoint
    (b"PK\x03\x04 garbage", "not a readable"),
    (None, "not found"),
])
def test_corrupt_or_missing(tmp_path, content, fragment):
    p = tmp_path / "c.npz"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(ck.CheckpointError, match=fragment) as info:
        ck.load_checkpoint(p)
    assert "\n" not in str(info.value)


def test_truncated_checkpoint(tmp_path):
    model, opt = trained()
    p = ck.save_checkpoint(tmp_path / "c.npz", model, opt)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(ck.CheckpointError, match="c.npz"):
        ck.load_checkpoint(p)


def test_not_a_minivae_npz_and_mismatched_params(tmp_path):
    p = tmp_path / "other.npz"
    np.savez(p, a=np.zeros(3))
    with pytest.raises(ck.CheckpointError, match="not a minivae checkpoint"):
        ck.load_checkpoint(p)
    model, opt = trained()
    p = ck.save_checkpoint(tmp_path / "c.npz", model, opt)
    with np.load(p) as z:
        arrays = {k: z[k] for k in z.files}
    cfg = json.loads(str(arrays["config"]))
    cfg["hidden"] = [9]                                           # config no longer matches the arrays
    arrays["config"] = np.array(json.dumps(cfg))
    np.savez(p, **arrays)
    with pytest.raises(ck.CheckpointError, match="shape"):
        ck.load_checkpoint(p).build_model()


def _rewrite(path, **changes):
    """Rewrite entries of a saved checkpoint (hand corruption)."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(changes)
    np.savez(path, **arrays)


@pytest.mark.parametrize("what, change, fragment", [
    ("1-D epoch", {"epoch": np.array([1, 2], dtype=np.int64)}, "corrupt 'epoch'"),
    ("float epoch", {"epoch": np.array(1.5)}, "corrupt 'epoch'"),
    ("settings list", {"settings": np.array("[1, 2]")}, "corrupt field settings: expected a JSON object"),
    ("history dict", {"history": np.array('{"epoch": 1}')}, "corrupt field history: expected a list"),
])
def test_hand_corrupted_metadata_is_one_line_naming_the_file(tmp_path, what, change, fragment):
    model, opt = trained()
    p = ck.save_checkpoint(tmp_path / "c.npz", model, opt, epoch=1, history=[{"epoch": 1}])
    _rewrite(p, **change)
    with pytest.raises(ck.CheckpointError, match=fragment) as info:
        ck.load_checkpoint(p)
    assert str(p) in str(info.value) and "\n" not in str(info.value)


def test_huge_config_is_refused_before_allocating(tmp_path, monkeypatch):
    model, opt = trained()
    p = ck.save_checkpoint(tmp_path / "c.npz", model, opt)
    cfg = json.loads(str(np.load(p)["config"]))
    cfg["hidden"] = [1e8]                               # a 16 x 1e8 matrix: 6.4 GB of float32
    _rewrite(p, config=np.array(json.dumps(cfg)))
    import minivae.model as mm
    monkeypatch.setattr(mm.VAE, "__init__", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(ck.CheckpointError, match=r"do not match the saved config|corrupt field config\.hidden") as info:
        ck.load_checkpoint(p)
    assert str(p) in str(info.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_parameters_are_refused(tmp_path, bad):
    model, opt = trained()
    model.params["dec.out.b"][3] = bad
    p = ck.save_checkpoint(tmp_path / "c.npz", model, opt)
    with pytest.raises(ck.CheckpointError, match="dec.out.b.*NaN or inf"):
        ck.load_checkpoint(p)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_write_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        p = ck.atomic_write(tmp_path / "f.json", lambda f: f.write("{}"), mode="w")
        model, opt = trained()
        c = ck.save_checkpoint(tmp_path / "c.npz", model, opt)
        with open(tmp_path / "plain", "w") as f:            # what open() gives a new file
            f.write("x")
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    for path in (p, c, tmp_path / "plain"):
        assert (os.stat(path).st_mode & 0o777) == want, oct(os.stat(path).st_mode)


def test_stale_temp_files_are_found(tmp_path):
    """Only atomic_write's exact names, of writers that are gone: never another file, nor a live writer's."""
    import itertools
    dead = next(pid for pid in itertools.count(4_000_000) if not os.path.exists(f"/proc/{pid}"))
    (tmp_path / f".checkpoint.npz.{dead}.abc123de.tmp").write_bytes(b"x" * 10)
    for name in (".checkpoint.npz.abc123.tmp", f".checkpoint.npz.{os.getppid()}.abc123de.tmp",
                 f".checkpoint.npz.{os.getpid()}.abc123de.tmp", ".notes.tmp", "history.json", ".lock"):
        (tmp_path / name).write_text("1")
    assert [p.name for p in ck.stale_temp_files(tmp_path)] == [f".checkpoint.npz.{dead}.abc123de.tmp"]


def test_archive_layout_and_defaults(tmp_path):
    m, opt = trained()
    ck.save_checkpoint(tmp_path / "a.npz", m, opt, settings={"b": 1, "a": 2})
    with np.load(tmp_path / "a.npz", allow_pickle=False) as z:
        keys = set(z.files)
        assert str(z["settings"]) == '{"a": 2, "b": 1}'                      # sorted: the same bytes every run
        assert z["epoch"].dtype == np.int64 and int(z["epoch"]) == 0          # epoch 0 unless given
    assert keys == {"format", "config", "epoch", "settings", "history", "rng", "opt/meta", "opt/0.m", "opt/0.v"} | \
        {"param/" + k for k in m.params}                                    # t and lr live in opt/meta only
    c = ck.load_checkpoint(tmp_path / "a.npz")
    assert c.epoch == 0 and set(c.opt_state) == {"0.m", "0.v"} and c.opt_meta["name"] == "adam"
    ck.save_checkpoint(tmp_path / "b.npz", m)
    assert ck.load_checkpoint(tmp_path / "b.npz").opt_meta is None and ck.load_checkpoint(tmp_path / "b.npz").opt_state == {}


def test_build_model_is_deterministic_and_checks_the_parameter_names(tmp_path):
    m, _ = trained()
    ck.save_checkpoint(tmp_path / "a.npz", m)
    c = ck.load_checkpoint(tmp_path / "a.npz")
    a, b = c.build_model(), c.build_model()
    assert np.array_equal(a.sample(3), b.sample(3))                            # the same model RNG each time
    for params, fragment in (({k: v for k, v in c.params.items() if k != "dec.out.b"}, "missing ['dec.out.b']"),
                             ({**c.params, "extra.W": np.zeros(2)}, "unexpected ['extra.W']")):
        bad = ck.Checkpoint(c.path, c.config, params, c.epoch, c.settings, c.history, c.rng, c.opt_meta, c.opt_state)
        with pytest.raises(ck.CheckpointError, match=__import__("re").escape(fragment)):
            bad.build_model()


def test_load_refuses_pickles_bad_history_and_names_the_first_shape_mismatch(tmp_path):
    m, _ = trained()
    ck.save_checkpoint(tmp_path / "a.npz", m, epoch=1, history=[{"epoch": 1}])
    with np.load(tmp_path / "a.npz", allow_pickle=False) as z:
        arrays = dict(z)
    np.savez(tmp_path / "pickle.npz", **{**arrays, "history": np.array([{"x": 1}], dtype=object)})
    with pytest.raises(ck.CheckpointError):
        ck.load_checkpoint(tmp_path / "pickle.npz")                           # never unpickles (no code runs)
    np.savez(tmp_path / "hist.npz", **{**arrays, "history": np.array(json.dumps([1, 2]))})
    with pytest.raises(ck.CheckpointError):
        ck.load_checkpoint(tmp_path / "hist.npz")                             # records must be dicts
    shapes = dict(arrays)
    shapes["param/enc.mu.b"] = np.zeros(7, dtype=np.float32)
    del shapes["param/dec.out.b"]
    np.savez(tmp_path / "shape.npz", **shapes)
    with pytest.raises(ck.CheckpointError, match=r"first mismatch: 'dec.out.b'"):
        ck.load_checkpoint(tmp_path / "shape.npz")


def test_atomic_write_makes_folders_and_a_hidden_temporary_beside_the_file(tmp_path):
    target = tmp_path / "a" / "b" / "file.txt"
    seen = []

    def write(f):
        seen.extend(p.name for p in target.parent.iterdir())
        f.write(b"hello")
    ck.atomic_write(target, write)
    assert target.read_bytes() == b"hello"
    (tmp,) = seen                                                              # while writing: one temp file
    assert tmp.startswith(".file.txt.") and tmp.endswith(".tmp") and tmp != ".file.txt..tmp"
    assert [p.name for p in target.parent.iterdir()] == ["file.txt"]           # and it is gone afterwards


_UNPICKLED = []


def _mark():
    _UNPICKLED.append(1)
    return 0


class _Evil:
    def __reduce__(self):
        return (_mark, ())


def test_loading_never_unpickles(tmp_path):
    m, _ = trained()
    ck.save_checkpoint(tmp_path / "a.npz", m)
    with np.load(tmp_path / "a.npz", allow_pickle=False) as z:
        arrays = dict(z)
    np.savez(tmp_path / "evil.npz", **arrays, evil=np.array([_Evil()], dtype=object))
    with pytest.raises(ck.CheckpointError):
        ck.load_checkpoint(tmp_path / "evil.npz")
    assert _UNPICKLED == []
    arrays["param/extra.W"] = np.zeros(2, dtype=np.float32)                  # a parameter the config lacks
    np.savez(tmp_path / "extra.npz", **arrays)
    with pytest.raises(ck.CheckpointError, match="first mismatch: 'extra.W'"):
        ck.load_checkpoint(tmp_path / "extra.npz")


def test_save_refuses_a_history_the_loader_would_refuse(tmp_path):
    m, opt = trained()
    for epoch, history in ((4, [{"epoch": 1}]), (1, []), (0, [{"epoch": 1}]), (2, [{"epoch": 2}, {"epoch": 1}])):
        with pytest.raises(ValueError, match=r"save_checkpoint: history: expected one record per epoch"):
            ck.save_checkpoint(tmp_path / "c.npz", m, opt, epoch=epoch, history=history)
        assert not (tmp_path / "c.npz").exists()                   # nothing written, not even a temp file
        assert os.listdir(tmp_path) == []
