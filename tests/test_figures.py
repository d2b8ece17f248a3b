"""What each figure draws: the frames and grids inside the picture, not only that a PNG was written.

Every figure ends in ``figures._save(fig, path)``; the tests keep that Figure and read back the arrays it
draws (the image mosaic, the curves, the scatter points), then cut the mosaic back into its cells and compare
each cell with the decode it should show, computed here from the model directly.
"""
from statistics import NormalDist

import numpy as np
import pytest

from minivae import VAE, VAEConfig, figures

SIDE = 4                    # 4 x 4 images: D = 16


@pytest.fixture
def drawn(monkeypatch):
    """Figures passed to figures._save, in order (they are still saved)."""
    figs = []
    save = figures._save

    def keep(fig, path):
        figs.append(fig)
        return save(fig, path)
    monkeypatch.setattr(figures, "_save", keep)
    return figs


def model(z_dim=2, seed=0):
    """A float64 Bernoulli model whose decodes change visibly with z."""
    m = VAE(VAEConfig(x_dim=SIDE * SIDE, hidden=(8,), z_dim=z_dim, dtype="float64"), rng=seed)
    m.params["dec.0.W"] = m.params["dec.0.W"] * 4
    m.params["dec.out.W"] = m.params["dec.out.W"] * 4
    m.params["enc.mu.W"] = m.params["enc.mu.W"] * 4
    return m


def images(n, seed=1):
    return np.random.default_rng(seed).random((n, SIDE * SIDE))


def cells(fig, ncols, n, h=SIDE, w=SIDE, pad=1):
    """Cut the mosaic drawn in ``fig`` back into its first ``n`` cells, as rows (n, h * w)."""
    (ax,) = fig.axes
    canvas = np.asarray(ax.images[0].get_array())
    out = []
    for i in range(n):
        r, c = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        out.append(canvas[y:y + h, x:x + w].ravel())
    return np.array(out), canvas


def test_tile_places_each_image_in_its_cell_on_a_white_canvas():
    a = np.array([[0.1, 0.2, 0.3, 0.4]])
    b = np.array([[0.5, 0.6, 0.7, 0.8]])
    c = np.array([[-1.0, 2.0, 0.0, 1.0]])                          # out of range: clipped to [0, 1]
    canvas = figures.tile(np.concatenate([a, b, c]), nrow=2)
    expect = np.ones((7, 7))                                     # 2 x 2 cells of 2 x 2, pad 1 around each
    expect[1:3, 1:3] = a.reshape(2, 2)
    expect[1:3, 4:6] = b.reshape(2, 2)
    expect[4:6, 1:3] = [[0.0, 1.0], [0.0, 1.0]]
    assert np.array_equal(canvas, expect)                        # the fourth cell stays blank (white)
    wide = figures.tile(np.arange(6.0).reshape(1, 6) / 10, nrow=1, pad=0, shape=(2, 3))
    assert np.array_equal(wide, np.arange(6.0).reshape(2, 3) / 10)
    with pytest.raises(ValueError, match="square"):
        figures.tile(np.zeros((1, 5)), nrow=1)


def test_interpolation_runs_from_mu_a_to_mu_b(tmp_path, drawn):
    m = model()
    xa, xb = images(2, seed=1), images(2, seed=2)
    steps = 5
    figures.interpolation(m, xa, xb, tmp_path / "i.png", steps=steps)
    got, _ = cells(drawn[-1], steps + 2, 2 * (steps + 2))
    got = got.reshape(2, steps + 2, -1)
    mu_a, mu_b = m.encode(xa)[0], m.encode(xb)[0]
    assert np.abs(m.decode(mu_a) - m.decode(mu_b)).max() > 0.05   # the two ends differ visibly
    for r in range(2):
        assert np.allclose(got[r, 0], xa[r]) and np.allclose(got[r, -1], xb[r])    # the two digits
        assert np.allclose(got[r, 1], m.decode(mu_a[r:r + 1])[0])                 # first frame: mu_a
        assert np.allclose(got[r, steps], m.decode(mu_b[r:r + 1])[0])             # last frame: mu_b
        for i, t in enumerate(np.linspace(0, 1, steps)):                          # and the line between
            z = (1 - t) * mu_a[r] + t * mu_b[r]
            assert np.allclose(got[r, 1 + i], m.decode(z[None])[0])


def test_reconstructions_show_the_images_over_their_reconstructions(tmp_path, drawn):
    m = model()
    x = images(5)
    figures.reconstructions(m, x, tmp_path / "r.png", n=3)
    got, _ = cells(drawn[-1], 3, 6)
    assert np.allclose(got[:3], x[:3])
    assert np.allclose(got[3:], m.decode(m.encode(x[:3])[0]))


def test_prior_samples_are_decodes_of_the_generators_draws(tmp_path, drawn):
    m = model(z_dim=3)
    figures.prior_samples(m, tmp_path / "s.png", np.random.default_rng(7), n=6, nrow=3)
    got, canvas = cells(drawn[-1], 3, 6)
    z = np.random.default_rng(7).standard_normal((6, 3))
    assert np.allclose(got, m.decode(z))
    assert canvas.shape == (2 * (SIDE + 1) + 1, 3 * (SIDE + 1) + 1)


def test_neighbourhood_is_the_digit_then_draws_from_its_posterior(tmp_path, drawn):
    m = model()
    x = images(3)
    figures.neighbourhood(m, x, tmp_path / "n.png", np.random.default_rng(4), n=5, nrow=3)
    got, _ = cells(drawn[-1], 3, 6)
    assert np.allclose(got[0], x[0])                              # only the first digit is used
    mu, logvar = m.encode(x[:1])
    z = mu + np.exp(0.5 * logvar) * np.random.default_rng(4).standard_normal((5, 2))
    assert np.allclose(got[1:], m.decode(z))


def test_manifold_grid_is_the_inverse_normal_cdf_of_an_even_grid(tmp_path, drawn):
    m = model()
    n, lo, hi = 4, 0.1, 0.9
    figures.manifold(m, tmp_path / "m.png", n=n, lo=lo, hi=hi)
    got, _ = cells(drawn[-1], n, n * n)
    u = np.linspace(lo, hi, n)
    g = np.array([NormalDist().inv_cdf(v) for v in u])
    assert np.isclose(g[0], -1.2815515655446004) and np.isclose(g[-1], 1.2815515655446004)
    for i in range(n):                       # row i: z2 from high (top) to low; column j: z1 from low to high
        for j in range(n):
            assert np.allclose(got[i * n + j], m.decode(np.array([[g[j], g[n - 1 - i]]]))[0]), (i, j)


def test_loss_curves_draw_the_history(tmp_path, drawn):
    hist = [{"epoch": e, "train_neg_elbo": 100.0 - e, "train_recon": 80.0 - e, "train_kl": 20.0 + e,
             "test_neg_elbo": 101.0 - 2 * e, "test_recon": 79.0 - e, "test_kl": 22.0 - e} for e in (1, 2, 3)]
    figures.loss_curves(hist, tmp_path / "c.png")
    a1, a2 = drawn[-1].axes
    lines1 = {ln.get_label(): ln for ln in a1.get_lines()}
    lines2 = {ln.get_label(): ln for ln in a2.get_lines()}
    assert set(lines1) == {"train", "test"}
    assert set(lines2) == {"train recon", "train KL", "test recon", "test KL"}
    for split in ("train", "test"):
        assert list(lines1[split].get_xdata()) == [1, 2, 3]
        assert list(lines1[split].get_ydata()) == [r[f"{split}_neg_elbo"] for r in hist]
        assert list(lines2[f"{split} recon"].get_ydata()) == [r[f"{split}_recon"] for r in hist]
        assert list(lines2[f"{split} KL"].get_ydata()) == [r[f"{split}_kl"] for r in hist]


def test_latent_scatter_puts_each_digit_at_its_posterior_mean(tmp_path, drawn):
    m = model()
    x = images(7)
    y = np.arange(7) % 3
    figures.latent_scatter(m, x, y, tmp_path / "z.png")
    ax = drawn[-1].axes[0]
    pts = ax.collections[0]
    assert np.allclose(pts.get_offsets(), m.encode(x)[0])
    assert np.array_equal(np.asarray(pts.get_array()), y)


def test_run_figures_interpolate_between_two_different_labels(tmp_path, drawn):
    m = model()
    x = images(10)
    y = np.array([3, 3, 3, 5, 5, 1, 1, 1, 1, 1])
    figures.run_figures(m, x, y, tmp_path)
    assert figures._two_different(y) == (0, 3)
    assert figures._two_different(np.array([2, 2, 2, 2, 2])) == (0, 2)    # one label: any other image
    assert figures._two_different(np.array([4, 4])) == (0, 0)
    inter = [f for f in drawn if "line between" in f.axes[0].get_title()]
    assert len(inter) == 1
    got, _ = cells(inter[0], 12, 24)
    assert np.allclose(got[0], x[0]) and np.allclose(got[11], x[3])         # first pair: images 0 and 3
    assert np.allclose(got[12], x[1]) and np.allclose(got[23], x[4])        # second pair: 1 and 4


def test_saving_many_samples_shows_a_bar_only_on_a_terminal(tmp_path, monkeypatch):
    # sample --n above the picture's cap writes an .npz chunk by chunk; the long write shows a bar counting
    # samples on a terminal, and nothing in a log file
    import io
    import sys

    from minivae import VAE, VAEConfig
    from minivae.figures import save_samples_npz

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    m = VAE(VAEConfig(x_dim=4, hidden=(3,), z_dim=2), rng=0)
    for tty in (True, False):
        err = Terminal() if tty else io.StringIO()
        monkeypatch.setattr(sys, "stderr", err)
        path = save_samples_npz(m, tmp_path / f"s{tty}.npz", np.random.default_rng(0), 300, chunk=100,
                                progress=True)
        assert np.load(path)["x"].shape == (300, 4)
        assert ("samples" in err.getvalue() and "/300" in err.getvalue()) == tty, err.getvalue()
