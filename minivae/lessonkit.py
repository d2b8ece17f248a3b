"""The small helpers the lessons share, so each lesson can stay a linear narrative of its own math.

Every lesson in ``lessons/`` needs the same three pieces of plumbing: a command line (``--quick``, ``--out``,
``--seed``), a way to state a claim and assert it (``CHECK passed: ...``), and, from lesson 11 on, a plain
minibatch training loop that is not itself the subject of the lesson.  They live here instead of being
copied into each file.  Lesson 10 writes its training loop out in full: that loop is what :func:`fit` runs.

* :func:`lesson_args`  ``--quick`` / ``--out DIR`` / ``--seed N``; unknown arguments are ignored, so a lesson
  also runs as a notebook inside Jupyter (whose kernel passes its own arguments).  In a kernel, where no flag
  can be passed, ``MINIVAE_QUICK=1`` in the environment selects quick mode
* :func:`check`        assert a claim and print ``CHECK passed: <claim>``
* :func:`save_figure`  save a figure under the lesson's output folder, and show it inline in a notebook
* :func:`fit`          shuffle, slice a minibatch, binarize it, loss + grads, optimizer step; ``steps`` times

Image mosaics come from :func:`minivae.figures.tile`.
"""
from __future__ import annotations

import argparse
import os

from . import data as _data
from .optim import Adam


def lesson_args(default_out, description, argv=None, quick_help="smaller, faster run (for tests)",
                seed_help=None):
    """Parse ``--quick``, ``--out`` (default ``default_out``) and ``--seed`` (default 0); create the out folder.

    Uses ``parse_known_args``: arguments a lesson does not know (Jupyter's ``-f kernel.json``) are ignored.
    Returns the :class:`argparse.Namespace` (``args.out`` stays a string).
    """
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", default=default_out, help="output folder for figures")
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    args = p.parse_known_args(argv)[0]
    args.quick = bool(args.quick or quick_from_env())
    os.makedirs(args.out, exist_ok=True)
    return args


def quick_from_env():
    """True when ``MINIVAE_QUICK`` is set to 1/true/yes (how a notebook kernel asks for quick mode)."""
    value = os.environ.get("MINIVAE_QUICK", "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise ValueError(f"MINIVAE_QUICK must be 1 or 0, got {value!r}")


def in_notebook():
    """True inside a Jupyter (IPython) kernel, where figures can be shown inline."""
    import sys
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:
        return False
    return shell is not None and hasattr(shell, "kernel")


def save_figure(fig, out, name):
    """Save ``fig`` as ``out/name`` (PNG, 100 dpi), show it inline in a notebook, close it; print the path.

    From the command line the figure is only saved.  In a Jupyter kernel it is also displayed, so every
    lesson reads as a notebook with its pictures.  Closing it keeps pyplot from showing it a second time.
    It returns None: a cell that ends with ``save_figure(...)`` shows the picture, not an ``Out:`` line.
    """
    from .atomic import save_figure as write_atomically
    path = os.path.join(out, name)
    write_atomically(fig, path)
    if in_notebook():
        from IPython.display import display
        display(fig)
    import matplotlib.pyplot as plt
    plt.close(fig)
    print(f"figure: {path}")


def check(cond, claim):
    """Assert ``cond``; on success print ``CHECK passed: <claim>`` (the tests count these lines)."""
    assert cond, f"CHECK failed: {claim}"
    print(f"CHECK passed: {claim}")


def fit(model, x, steps, rng, batch_size=128, opt=None, beta=1.0, binarize=True, on_step=None, loss_kwargs=None,
        labels=None):
    """Train ``model`` in place for ``steps`` optimizer steps on minibatches of the rows of ``x``.

    The loop of lesson 10, without its bookkeeping.  Each epoch draws a fresh permutation from ``rng``
    (``minivae.data.minibatches``); each minibatch is binarized with a fresh draw from ``rng`` (dynamic
    binarization, ``binarize=False`` skips it), then ``loss, grads = model.loss(xb, beta=b)`` and
    ``opt.step(model.params, grads)``.  An epoch may stop part-way: training ends after exactly ``steps`` steps.

    ``beta`` is a number or a callable ``beta(step)`` of the 0-based step index (e.g. a KL warm-up
    ``lambda t: min(1.0, t / T)``).  ``opt`` defaults to ``Adam(lr=1e-3)``.  ``on_step(step, beta)``, if given, is
    called after each update with the 1-based step count; ``model.parts`` then holds that minibatch's
    loss, recon and kl.  ``loss_kwargs`` are passed on to every ``model.loss`` call, e.g.
    ``{"iwae_k": 5}`` or ``{"free_bits": 0.25}`` to train on another objective.  ``labels`` (N,): the class
    of each row of x, for a conditional model (``model.loss(xb, y=labels[idx])``).  Returns the optimizer
    (its state lets training continue).
    """
    steps = int(steps)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    opt = Adam(lr=1e-3) if opt is None else opt
    loss_kwargs = dict(loss_kwargs or {})
    step = 0
    while step < steps:
        for idx in _data.minibatches(len(x), batch_size, rng):
            b = beta(step) if callable(beta) else beta
            xb = _data.binarize(x[idx], rng) if binarize else x[idx]
            kwargs = loss_kwargs if labels is None else dict(loss_kwargs, y=labels[idx])
            _, grads = model.loss(xb, beta=b, **kwargs)
            opt.step(model.params, grads)
            step += 1
            if on_step is not None:
                on_step(step, b)
            if step >= steps:
                break
    return opt
