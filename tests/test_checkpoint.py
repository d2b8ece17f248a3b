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
    path = ck.save_checkpoint(tmp_path / "c.npz", model, opt, rngs, {"lr": 0.01}, epoch=4,
                              history=[{"epoch": 1, "x": 2.5}])
    with np.load(path, allow_pickle=False) as z:                # no object arrays anywhere
        assert "param/enc.0.W" in z.files and "opt/0.m" in z.files
    c = ck.load_checkpoint(path)
    assert c.epoch == 4 and c.settings == {"lr": 0.01} and c.history == [{"epoch": 1, "x": 2.5}]
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
    path = ck.save_checkpoint(tmp_path / "checkpoint.npz", model, opt, epoch=1)
    before = path.read_bytes()

    def broken_savez(f, **arrays):
        f.write(b"half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(path, model, opt, epoch=2)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["checkpoint.npz"]           # the temp file is gone
    assert ck.load_checkpoint(path).epoch == 1


@pytest.mark.parametrize("content, fragment", [
    (b"", "not a readable"),
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
