"""lessonkit.fit: the lessons' training loop, and its loss_kwargs (another objective at every step)."""
import numpy as np
import pytest

from minivae import VAE, VAEConfig
from minivae.data import binarize, minibatches
from minivae.lessonkit import fit
from minivae.optim import Adam


def _data():
    return np.random.default_rng(0).uniform(size=(30, 6)).astype(np.float32)


@pytest.mark.parametrize("loss_kwargs", [None, {"iwae_k": 3}, {"free_bits": 0.2}])
def test_fit_is_the_plain_loop_with_the_given_objective(loss_kwargs):
    """fit(..., loss_kwargs=kw) gives exactly the parameters of the loop written out with model.loss(xb, **kw)."""
    x = _data()
    cfg = VAEConfig(x_dim=6, hidden=(5,), z_dim=2)
    a, b = VAE(cfg, rng=1), VAE(cfg, rng=1)
    fit(a, x, 7, np.random.default_rng(2), batch_size=8, loss_kwargs=loss_kwargs)
    rng, opt, step = np.random.default_rng(2), Adam(lr=1e-3), 0
    while step < 7:
        for idx in minibatches(len(x), 8, rng):
            _, grads = b.loss(binarize(x[idx], rng), beta=1.0, **(loss_kwargs or {}))
            opt.step(b.params, grads)
            step += 1
            if step >= 7:
                break
    np.testing.assert_array_equal(a.flat, b.flat)


def test_fit_passes_loss_kwargs_to_every_step():
    x = _data()
    model = VAE(VAEConfig(x_dim=6, hidden=(5,), z_dim=2), rng=1)
    seen, real = [], model.loss

    def spy(xb, **kw):
        seen.append(kw)
        return real(xb, **kw)

    model.loss = spy
    fit(model, x, 5, np.random.default_rng(0), batch_size=8, loss_kwargs={"iwae_k": 4})
    assert len(seen) == 5 and all(kw == {"beta": 1.0, "iwae_k": 4} for kw in seen)
    plain = VAE(VAEConfig(x_dim=6, hidden=(5,), z_dim=2), rng=1)
    fit(plain, x, 5, np.random.default_rng(0), batch_size=8)
    assert not np.array_equal(plain.flat, model.flat)          # the objective changed the training


def test_save_figure_saves_prints_and_returns_nothing(tmp_path, capsys):
    """A notebook cell ending in save_figure(...) shows the picture, not an Out: line with a path."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from minivae.lessonkit import save_figure
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    assert save_figure(fig, str(tmp_path), "sub/line.png") is None
    assert (tmp_path / "sub" / "line.png").stat().st_size > 0
    assert capsys.readouterr().out.strip() == f"figure: {tmp_path / 'sub' / 'line.png'}"
