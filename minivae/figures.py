"""Figures of a trained VAE, drawn into PNG files.

Every function takes NumPy arrays (or a model) and a path, writes one PNG and
returns the path.  Images are rows of length D = side * side (28 * 28 for
MNIST), or H * W for a model whose config records ``image_shape`` (1, H, W);
pixel values are shown on [0, 1] in grey.

* :func:`reconstructions`  originals in the top row, mean reconstructions below
* :func:`prior_samples`    an 8 x 8 grid of E[x|z], z ~ p(z) = N(0, I)
* :func:`loss_curves`      train/test negative ELBO and its parts per epoch
* :func:`interpolation`    decode((1 - t) mu_a + t mu_b) between two encoded digits
* :func:`neighbourhood`    decodes of z ~ q(z|x) around one encoded digit
* :func:`manifold`         (z_dim = 2) a grid of decodes at z = (Phi^-1(u), Phi^-1(v)),
                           u, v evenly spaced in (0, 1): equal probability mass of
                           the prior between neighbours, as in Kingma & Welling (2014)
* :func:`latent_scatter`   (z_dim = 2) the posterior means of test digits coloured by label
* :func:`class_grid`       (conditional model) E[x|z, y]: one row per class y, one column per shared z draw

A conditional model (``n_classes``) needs the labels: the functions that encode or decode take ``y`` (the
labels of the rows of x, or the label to decode with), and :func:`run_figures` passes them.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import NormalDist

import numpy as np
# The object-oriented Figure API draws without pyplot, so importing minivae never changes matplotlib's global
# backend (a Jupyter session keeps its inline backend) and no GUI window is ever opened; savefig renders with Agg.
from matplotlib.figure import Figure

from .backend import to_numpy


def _subplots(*args, **kwargs):
    """``plt.subplots`` without pyplot: a standalone Figure and its axes."""
    fig = Figure(figsize=kwargs.pop("figsize", None))
    axes = fig.subplots(*args, **kwargs)
    return fig, axes

# Bounded memory: every decode below runs CHUNK rows at a time, and a picture holds at most
# MAX_PICTURE images (a 32 x 32 grid; more is no longer readable) or a MAX_GRID x MAX_GRID manifold.
# ``minivae sample`` writes larger requests as an .npz, in chunks (save_samples_npz).
CHUNK = 1024
MAX_PICTURE = 1024
MAX_GRID = 100
MAX_INCHES = 40.0            # at 100 dpi: at most 4000 x 4000 pixels per figure


def decode_chunks(model, z, chunk=CHUNK, y=None):
    """E[x|z] for the rows of z (host array), ``chunk`` rows at a time, as one host array (N, D).

    ``y``: a conditional model's label, one for all rows or one per row."""
    z = np.asarray(z)
    y = None if y is None else _labels(y, len(z))[0]
    out = None
    for i in range(0, len(z), chunk):
        yz = () if y is None else (y[i:i + chunk],)
        d = to_numpy(model.decode(z[i:i + chunk].astype(model.dtype), *yz))
        if out is None:
            out = np.empty((len(z), d.shape[1]), dtype=d.dtype)
        out[i:i + len(d)] = d
    return out


def sample_chunks(model, n, rng, chunk=CHUNK, y=None):
    """Yield the model's samples ``model.sample(m, rng, y)`` in blocks of at most ``chunk`` rows; n rows in all.

    Each block is the model's own draw: E[x|z] for z ~ N(0, I); a learned prior's z ~ p(z); two stochastic
    layers' z2 ~ N(0, I), z1 ~ p(z1|z2); M2's class y ~ p(y) unless ``y`` is given; the MADE decoder's pixels
    drawn from ``rng``.  For a model whose draw is z ~ N(0, I) alone, the blocks are the same stream as one draw
    of (n, L): the samples do not depend on ``chunk``, and equal ``model.sample(n, rng)``.  ``y``: one label for
    every draw of a conditional model (or M2).
    """
    from . import signals
    for i in range(0, int(n), chunk):
        signals.check()                  # a Ctrl-C or SIGTERM whose exception a library swallowed stops here
        yield to_numpy(model.sample(min(chunk, int(n) - i), rng, y=y))


def save_samples_npz(model, path, rng, n, chunk=CHUNK, y=None, progress=False):
    """Write n samples E[x|z] as ``x`` (n, D) in an .npz, streamed chunk by chunk (memory: one chunk).

    The archive is written with the package's atomic writer; ``np.load(path)["x"]`` reads it.  ``progress=True``
    shows a bar on stderr when it is a terminal.
    """
    import zipfile

    from .atomic import atomic_write
    D = model.config.x_dim

    def write(f):
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("x.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_2_0(
                    member, {"descr": np.lib.format.dtype_to_descr(np.dtype(model.dtype)),
                             "fortran_order": False, "shape": (int(n), D)})
                bar = None
                if progress:
                    import sys

                    from tqdm import tqdm
                    bar = tqdm(total=int(n), desc="samples", unit="sample", unit_scale=True, leave=False,
                               disable=None, file=sys.stderr)
                try:
                    for block in sample_chunks(model, n, rng, chunk, y=y):
                        member.write(np.ascontiguousarray(block, dtype=model.dtype).tobytes())
                        if bar is not None:
                            bar.update(len(block))
                finally:
                    if bar is not None:
                        bar.close()
    return atomic_write(path, write)


def _side(d):
    s = int(round(math.sqrt(d)))
    if s * s != d:
        raise ValueError(f"cannot show vectors of length {d} as square images")
    return s


def _hw(model):
    """(H, W) of a model's single-channel images, or None (square images of side sqrt(D))."""
    shape = getattr(model.config, "image_shape", None)
    return tuple(shape[1:]) if shape is not None and shape[0] == 1 else None


def tile(images, nrow, pad=1, shape=None):
    """(N, D) rows -> one 2-D mosaic with ``nrow`` images per row (unused cells blank).

    ``shape`` (H, W) of one image; default square, H = W = sqrt(D).
    """
    images = np.clip(np.asarray(to_numpy(images), dtype=np.float64), 0.0, 1.0)
    n, d = images.shape
    h, w = (_side(d),) * 2 if shape is None else shape
    cols = int(nrow)
    rows = max(1, math.ceil(n / cols))
    canvas = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad))
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        canvas[y:y + h, x:x + w] = images[i].reshape(h, w)
    return canvas


def _save(fig, path):
    """Write ``fig`` to ``path`` through the package's atomic writer: a failed write (a full disk, ``ulimit -f``,
    Ctrl-C) leaves the previous picture whole."""
    from .atomic import save_figure
    return save_figure(fig, path)


def image_grid(images, nrow, path, title=None, scale=0.45, shape=None):
    """Save (N, D) images as a grid with ``nrow`` images per row (``shape``: (H, W), default square)."""
    canvas = tile(images, nrow, shape=shape)
    h, w = canvas.shape
    fw, fh = max(2.0, w / 28 * scale * 2), max(1.2, h / 28 * scale * 2)
    shrink = min(1.0, MAX_INCHES / max(fw, fh))          # bounded figure (and memory) whatever the grid
    fig, ax = _subplots(figsize=(fw * shrink, fh * shrink))
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def reconstructions(model, x, path, n=10, y=None):
    """Top row: the first ``n`` images of x; bottom row: decode(mu(x)) (labels ``y`` for a conditional model)."""
    x = np.asarray(to_numpy(x))[:n]
    rec = to_numpy(model.reconstruct(x, *_labels(y, n)))
    return image_grid(np.concatenate([x, rec]), len(x), path,
                      title="top: test images   bottom: reconstructions E[x | z = mu(x)]", shape=_hw(model))


def prior_samples(model, path, rng, n=64, nrow=8, y=None):
    """An nrow x nrow grid of E[x|z] for z ~ N(0, I) drawn from ``rng`` (at most MAX_PICTURE images).

    A conditional model draws E[x|z, y] for the label ``y``; M2 (minivae.m2) too, or without ``y`` draws each
    sample's class from its prior p(y)."""
    if n > MAX_PICTURE:
        raise ValueError(f"a picture shows at most {MAX_PICTURE} samples, got n={n}; write them with "
                         "save_samples_npz")
    images = np.concatenate(list(sample_chunks(model, n, rng, y=y)))
    title = sample_title(model, y)
    return image_grid(images, nrow, path, title=title, shape=_hw(model))


def sample_title(model, y=None):
    """What a grid of ``model.sample`` shows: E[x|z] and where z came from (the model's prior)."""
    c = model.config
    given = "z" if y is None else f"z, y={y}"
    if getattr(model, "semi_supervised", False) and y is None:
        return "E[x|z, y], y ~ p(y), z ~ N(0, I)"
    if hasattr(model, "L2"):                                    # two stochastic layers (minivae.twolayer)
        return "E[x|z1], z2 ~ N(0, I), z1 ~ p(z1|z2)"
    if getattr(c, "decoder", "factorised") == "made":
        return f"p(x_d = 1|x_<d, z) along a draw x ~ p(x|z), z ~ {getattr(c, 'prior', None) or 'N(0, I)'}"
    return f"E[x|{given}], z ~ " + (f"p(z) = {c.prior}" if getattr(c, "prior", None) else "N(0, I)")


def loss_curves(history, path):
    """Two panels: negative ELBO (train/test/valid) and its recon/KL parts, per epoch."""
    if isinstance(history, (str, Path)):
        history = json.loads(Path(history).read_text())
    ep = [r["epoch"] for r in history]
    fig, (a1, a2) = _subplots(1, 2, figsize=(10, 3.6))
    for split, style in (("train", "-o"), ("test", "-s"), ("valid", "-^")):
        key = f"{split}_neg_elbo"
        if history and key in history[0]:
            a1.plot(ep, [r[key] for r in history], style, ms=3, label=split)
            a2.plot(ep, [r[f"{split}_recon"] for r in history], style, ms=3, label=f"{split} recon")
            a2.plot(ep, [r[f"{split}_kl"] for r in history], style.replace("-", "--"), ms=3, label=f"{split} KL")
    a1.set(xlabel="epoch", ylabel="nats per image", title="negative ELBO")
    a2.set(xlabel="epoch", ylabel="nats per image", title="reconstruction and KL")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def interpolation(model, xa, xb, path, steps=10, y=None):
    """Decode z_t = (1 - t) mu(xa) + t mu(xb), t = 0..1, for each pair of rows of xa, xb.

    A conditional model takes ``y``, one label per pair (both digits of a pair have it): every frame of the
    pair is decoded with that label.
    """
    xa, xb = np.atleast_2d(to_numpy(xa)), np.atleast_2d(to_numpy(xb))
    mu_a = to_numpy(model.encode(xa, *_labels(y, len(xa)))[0])
    mu_b = to_numpy(model.encode(xb, *_labels(y, len(xb)))[0])
    t = np.linspace(0.0, 1.0, steps)[None, :, None]
    z = ((1 - t) * mu_a[:, None, :] + t * mu_b[:, None, :]).reshape(-1, mu_a.shape[1])
    z = through_flow(model, z)           # a flow's image of the line: from f(mu(xa)) to f(mu(xb))
    if steps > MAX_GRID:
        raise ValueError(f"an interpolation shows at most {MAX_GRID} steps, got {steps}")
    y_rows = None if y is None else np.repeat(np.broadcast_to(np.asarray(to_numpy(y)), (len(xa),)), steps)
    dec = decode_chunks(model, z, y=y_rows).reshape(len(xa), steps, -1)
    rows = np.concatenate([xa[:, None], dec, xb[:, None]], axis=1).reshape(-1, xa.shape[1])
    return image_grid(rows, steps + 2, path,
                      title=f"left/right: two test digits; between: decodes of {steps} points on the line "
                            "between their latent means", shape=_hw(model))


def neighbourhood(model, x, path, rng, n=63, nrow=8, y=None):
    """The digit x (first cell), then decodes of z ~ q(z|x) = N(mu(x), sigma(x)^2) (label ``y`` if conditional)."""
    x = np.atleast_2d(to_numpy(x))[:1]
    mu, logvar = (to_numpy(a) for a in model.encode(x, *_labels(y, 1)))
    z = through_flow(model, mu + np.exp(0.5 * logvar) * rng.standard_normal((n, mu.shape[1])))   # z ~ q(z|x)
    dec = to_numpy(model.decode(z.astype(model.dtype), *_labels(y, n)))
    return image_grid(np.concatenate([x, dec]), nrow, path,
                      title="first: a test digit; others: E[x|z] for z ~ q(z|x)", shape=_hw(model))


def two_layer_manifold_refusal(model, name="this model"):
    """Why there is no 2-D manifold of two stochastic layers (minivae.twolayer)."""
    return (f"the 2-D manifold decodes a grid over one latent layer; {name} has two stochastic layers (z1 of "
            f"{model.L1}, z2 of {model.L2} dimensions) and its decoder reads z1 alone, so a grid over [z1, z2] "
            "would repeat each picture along z2")


def manifold(model, path, n=20, lo=0.05, hi=0.95, y=None):
    """(z_dim = 2) an n x n grid of E[x|z] (E[x|z, y] for the label y if conditional) at z = Phi^-1 of an even
    grid in (lo, hi)^2."""
    if hasattr(model, "L2"):        # two stochastic layers: z is [z1, z2], and the decoder reads z1 alone
        raise ValueError(two_layer_manifold_refusal(model))
    if model.config.z_dim != 2:
        raise ValueError(f"the 2-D manifold needs a model with a 2-D latent space; this one has z_dim="
                         f"{model.config.z_dim} (train with --latent 2)")
    if n > MAX_GRID:
        raise ValueError(f"the manifold grid is at most {MAX_GRID} x {MAX_GRID} (a bigger picture is not "
                         f"readable), got {n}")
    ppf = NormalDist().inv_cdf
    g = np.array([ppf(u) for u in np.linspace(lo, hi, n)])
    zy, zx = np.meshgrid(g[::-1], g, indexing="ij")          # rows: z2 from high to low; cols: z1 low to high
    z = np.stack([zx.ravel(), zy.ravel()], axis=1).astype(model.dtype)
    dec = decode_chunks(model, z, y=y)
    given = "z" if y is None else f"z, y={y}"
    return image_grid(dec, n, path, title=f"E[x|{given}] on a {n}x{n} grid z = Phi^-1(u), u in [{lo}, {hi}]",
                      scale=0.35, shape=_hw(model))


def latent_scatter(model, x, y, path):
    """(z_dim = 2) the posterior means mu(x) (through a flow in q(z|x): f(mu(x)), where the decoder reads) coloured
    by the labels y."""
    if model.config.z_dim != 2:
        raise ValueError(f"the latent scatter needs z_dim=2; this model has z_dim={model.config.z_dim}")
    conditional = label_classes(model) is not None
    mu = through_flow(model, to_numpy(model.encode(np.asarray(x), *((np.asarray(y),) if conditional else ()))[0]))
    fig, ax = _subplots(figsize=(6, 5))
    sc = ax.scatter(mu[:, 0], mu[:, 1], c=np.asarray(y), cmap="tab10", s=3, alpha=0.7)
    fig.colorbar(sc, ax=ax, label="label")
    ax.set(xlabel="z1 (posterior mean)", ylabel="z2 (posterior mean)", title="test digits in latent space")
    fig.tight_layout()
    return _save(fig, path)


def run_figures(model, x_test, y_test, out_dir, history_path=None, seed=0, label_accuracy=None):
    """Every figure of a run into ``out_dir/figures``; returns the paths written.

    ``label_accuracy``: a conditional model's judged samples (:func:`minivae.judge.label_accuracy`, with the
    judge's ``judge_test_accuracy``), written into the title of ``class_grid.png``."""
    d = Path(out_dir) / "figures"
    rng = np.random.default_rng(seed)
    x = np.asarray(x_test)
    if _hw(model) is None:
        try:
            _side(x.shape[1])
        except ValueError:
            return []                               # not images: only numbers, no pictures
    if label_classes(model) is not None:             # a conditional model, or M2: each decode takes a label
        return _conditional_figures(model, x, np.asarray(y_test), d, history_path, rng, label_accuracy)
    paths = [reconstructions(model, x, d / "reconstructions.png"),
             prior_samples(model, d / "samples.png", rng)]
    if history_path is not None and Path(history_path).exists():
        paths.append(loss_curves(history_path, d / "loss_curves.png"))
    a, b = _two_different(y_test)
    last = len(x) - 1                              # (a test set of 1 image: the pair is that image twice)
    paths.append(interpolation(model, x[[a, min(a + 1, last)]], x[[b, min(b + 1, last)]],
                               d / "interpolation.png"))
    paths.append(neighbourhood(model, x[a], d / "neighbourhood.png", rng))
    if model.config.z_dim == 2 and not hasattr(model, "L2"):       # (two layers: figures.manifold's refusal)
        paths.append(manifold(model, d / "manifold.png"))
        k = min(len(x), 5000)
        paths.append(latent_scatter(model, x[:k], np.asarray(y_test)[:k], d / "latent_scatter.png"))
    return paths


def _two_different(y):
    """Indices of the first test image and of the first one with another label."""
    y = np.asarray(y)
    n = len(y)
    if n < 4:
        return 0, max(0, n - 2)
    others = np.flatnonzero(y[: n - 1] != y[0])
    b = int(others[0]) if len(others) else 2
    return 0, min(b, n - 2)


def through_flow(model, z):
    """Points z of q(z|x)'s base Gaussian (what ``encode`` describes) as the decoder reads them: through a flow in
    q(z|x) (``model.flow_z``, minivae.families), unchanged for a model without one.  Host array (N, L)."""
    f = getattr(model, "flow_z", None)
    return np.asarray(z) if f is None else to_numpy(f(np.asarray(z)))


# --------------------------------------------------------------- conditional
def label_classes(model):
    """The number of classes whose label a model's decoder reads: a conditional model's ``n_classes``, and M2's
    ``classes`` (minivae.m2: p(x|y, z) takes the class, which q(y|x) guesses when it is not given; its
    ``n_classes`` stays None, as it models p(x)); None for a model that reads no labels."""
    n = getattr(model.config, "n_classes", None)
    if n is None and getattr(model, "semi_supervised", False):
        n = model.config.classes
    return n


def _labels(y, n):
    """``()`` without labels, else ``(labels,)``: y broadcast to n labels (a scalar) or its first n."""
    if y is None:
        return ()
    y = np.asarray(to_numpy(y))
    return (np.full(n, int(y)),) if y.ndim == 0 else (y[:n],)


def class_grid_images(model, rng, n_cols=10):
    """E[x|z_j, y = k] for every class k (rows) and ``n_cols`` shared draws z_j ~ N(0, I) (columns).

    Returns (K * n_cols, D): row k * n_cols + j is class k decoded at z_j.  The same z in every row is
    the same "style" (slant, thickness) written as each digit.
    """
    K = label_classes(model)
    if K is None:
        raise ValueError("the class grid needs a conditional model (n_classes=K); this one is unconditional")
    z = rng.standard_normal((int(n_cols), model.config.z_dim)).astype(model.dtype)
    zz = np.tile(z, (K, 1))                                 # row k * n_cols + j holds z_j
    yy = np.repeat(np.arange(K), int(n_cols))               # ... and label k
    return to_numpy(model.decode(zz, yy))


def class_grid_title(label_accuracy=None):
    """The class grid's title; with a judge's verdict (:func:`minivae.judge.label_accuracy`), the recognition
    rate, the worst label and the judge's own accuracy on real test images."""
    title = "rows: label y = 0, 1, ...;  columns: shared z ~ N(0, I)"
    if label_accuracy is None:
        return title
    a = label_accuracy
    return (title + f"\n{100 * a['overall']:.1f}% of {a['n']} prior samples recognised as their label "
            f"(worst: {a['worst_label']}, {100 * a['worst']:.0f}%)\nby a judge {100 * a['judge_test_accuracy']:.1f}% "
            f"right on real test images")


def class_grid(model, path, rng, n_cols=10, label_accuracy=None):
    """(conditional model) One row per class y, one column per shared z ~ N(0, I): E[x|z, y].  The title gives
    the judge's recognition rate when ``label_accuracy`` is given (:func:`class_grid_title`)."""
    images = class_grid_images(model, rng, n_cols)
    return image_grid(images, int(n_cols), path, title=class_grid_title(label_accuracy), shape=_hw(model))


def _conditional_figures(model, x, y, d, history_path, rng, label_accuracy=None):
    """The figures of a conditional run, or of M2: every decode uses the test digit's own label."""
    paths = [reconstructions(model, x, d / "reconstructions.png", y=y),
             class_grid(model, d / "class_grid.png", rng, label_accuracy=label_accuracy)]
    if history_path is not None and Path(history_path).exists():
        paths.append(loss_curves(history_path, d / "loss_curves.png"))
    same = np.flatnonzero(y[1:] == y[0]) + 1               # a second test digit with the first one's label
    if len(same):
        b = int(same[0])
        paths.append(interpolation(model, x[[0]], x[[b]], d / "interpolation.png", y=y[[0]]))
    paths.append(neighbourhood(model, x[0], d / "neighbourhood.png", rng, y=y[0]))
    if model.config.z_dim == 2:
        paths.append(manifold(model, d / "manifold.png", y=int(y[0])))
        k = min(len(x), 5000)
        paths.append(latent_scatter(model, x[:k], y[:k], d / "latent_scatter.png"))
    return paths
