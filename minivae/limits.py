"""Memory limits: refuse, with one line, a request that cannot fit before anything is allocated.

Every command that is asked for N of something works in chunks (sampling, grids,
IWAE training over K, evaluation), so its memory does not grow with N.  What is
left to check is the model itself: its parameters (and, for training, their
gradients and the optimizer's state) must fit.  ``--hidden 100000000`` asks for
a 784 x 1e8 weight matrix, 313 GB in float32; it is refused here, before NumPy
tries (a ``MemoryError`` traceback at best, the kernel's OOM killer at worst).
"""
from __future__ import annotations

import math
import os

import numpy as np


def available_bytes():
    """Memory this process may still use: MemAvailable (Linux), else the physical memory, else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def num_params(config):
    """Number of parameters of a VAE with this config (from the shapes alone, nothing allocated)."""
    from .model import param_shapes
    return sum(math.prod(shape) for _, shape in param_shapes(config))


def model_bytes(config, copies=1):
    """Bytes of ``copies`` arrays the size of the model's parameters."""
    return copies * num_params(config) * np.dtype(config.dtype).itemsize


def training_bytes(config, batch_size, iwae_k=None):
    """A rough upper bound of what training holds: 6 parameter-sized arrays (parameters, gradients,
    Adam's m and v, the fast step's scratch, the checkpoint's copy) and the activations of the rows one step
    holds at once.  The plain VAE's IWAE bound works in chunks of samples (``VAE._iwae_chunk``: K does not
    count beyond one chunk); a model of another kind (:data:`minivae.model.MODEL_KINDS`, the flows and the
    MADE decoder) holds all K samples of the batch at once."""
    item = np.dtype(config.dtype).itemsize
    widths = config.x_dim * 4 + sum(config.hidden) * 4 + config.z_dim * 8
    k = int(iwae_k or 1)
    if getattr(config, "kind", "vae") == "vae":
        from .model import VAE
        from .networks import get_architecture
        widest = get_architecture(config.arch).widest_row(config)
        k = min(k, max(1, VAE.IWAE_CHUNK_ELEMENTS // (int(batch_size) * widest)))
    rows = int(batch_size) * k
    return model_bytes(config, 6) + rows * widths * item


def _size(n):
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000.0


def check_fits(nbytes, what, advice="choose a smaller model"):
    """ValueError (one line) if ``nbytes`` is more than the memory available now."""
    avail = available_bytes()
    if avail is not None and nbytes > avail:
        raise ValueError(f"{what} needs about {_size(nbytes)} of memory, more than the {_size(avail)} available "
                         f"on this machine; {advice}")
    return nbytes


# ------------------------------------------------------------------------------------------ disk
def free_disk_bytes(folder):
    """Free bytes on the file system that holds ``folder`` (its nearest existing parent), or None."""
    import shutil
    from pathlib import Path
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


DISK_SHARE = 0.9


def check_disk(nbytes, folder, what, advice):
    """ValueError (one line) if writing ``nbytes`` into ``folder`` cannot fit on its disk; returns nbytes."""
    free = free_disk_bytes(folder)
    if free is not None and nbytes > DISK_SHARE * free:       # never fill a disk: leave a tenth of what is free
        raise ValueError(f"{what} writes about {_size(nbytes)} to {folder}, more than {DISK_SHARE:.0%} of the "
                         f"{_size(free)} free on that disk; {advice}")
    return nbytes


def sample_file_bytes(config, n):
    """Bytes of ``sample``'s .npz of n samples: n x D values of the model's dtype (and a small header)."""
    return int(n) * config.x_dim * np.dtype(config.dtype).itemsize + 4096


# ------------------------------------------------------------------------------------------ work
# Work is counted in multiply-adds, from below: every weight of a network is used at least once per example it
# sees (a convolution's many times more), so the count can only be too small, never too large.
# Multiply-adds a second, per backend: (typical, fastest).  The typical rate (a few CPU cores; one GPU) gives
# the estimate that is shown; the fastest (far beyond any one machine minivae runs on) decides what cannot
# finish: more than MAX_SECONDS even at that rate is refused.
RATES = {"numpy": (1e10, 1e12), "cupy": (1e12, 1e14)}
MAX_SECONDS = 7 * 86400     # refused: more than a week even at the fastest rate
SHOW_SECONDS = 60.0         # shown: more than a minute at the typical rate


def weights(config, prefix):
    """Number of weights of the encoder (``"enc."``) or the decoder (``"dec."``) of a config."""
    from .model import param_shapes
    return sum(math.prod(shape) for name, shape in param_shapes(config) if name.startswith(prefix))


def example_macs(config, labelled=False):
    """``(once, per_draw)``: at least this many multiply-adds per example in one forward pass of the model's
    loss, the part computed once per example and the part computed again for every draw of z.

    The model kind says it (:class:`minivae.model.ModelKind`'s ``work``): the VAE counts its layers (a
    convolution at each position), two stochastic layers run q(z1|x) once and q(z2|z1), p(z1|z2), p(x|z1) per
    draw, the MADE decoder and the flows run per draw, and M2 runs its classifier and the first layer of its
    encoder once but the rest of q(z|x, y) and p(x|y, z) once per class for an unlabelled example
    (``labelled=True``: the one class given).  A kind without ``work``: its encoder's (enc.*) weights once,
    its decoder's (dec.*) per draw."""
    from .model import get_model_kind
    kind = get_model_kind(config)
    if kind.work is not None:
        once, per_draw = kind.work(config, labelled)
        return int(once), int(per_draw)
    return weights(config, "enc."), weights(config, "dec.")


def iw_macs(config, n_images, k):
    """At least this many multiply-adds for an importance-weighted bound with k samples of n images."""
    once, per_draw = example_macs(config)
    return int(n_images) * (once + int(k) * per_draw)


def training_macs(config, n_train, epochs, iwae_k=None, n_labelled=0):
    """At least this many multiply-adds for ``epochs`` passes over n_train images (forward and backward, ~3x;
    the IWAE bound decodes K samples of each image; :func:`example_macs` per family).  ``n_labelled``: how many
    of the images carry a label (M2: those cost one class, the others every class)."""
    k = int(iwae_k or 1)
    once, per_draw = example_macs(config)
    per_epoch = (int(n_train) - int(n_labelled)) * (once + k * per_draw)
    if n_labelled:
        once_l, per_draw_l = example_macs(config, labelled=True)
        per_epoch += int(n_labelled) * (once_l + k * per_draw_l)
    return 3 * int(epochs) * per_epoch


def _duration(seconds):
    for unit, s in (("years", 365 * 86400), ("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= s:
            return f"{seconds / s:.3g} {unit}"
    return f"{seconds:.2g} seconds"


def check_work(macs, what, advice, backend="numpy"):
    """ValueError (one line) if ``macs`` multiply-adds cannot finish: more than MAX_SECONDS even at the
    backend's fastest rate (:data:`RATES`).

    Returns a one-line estimate for work that is long but feasible (more than SHOW_SECONDS at the typical
    rate), to be shown before it starts, or None."""
    typical, fastest = RATES.get(backend, RATES["numpy"])
    macs = float(macs)
    if macs / fastest > MAX_SECONDS:
        raise ValueError(f"{what} needs at least {macs:.2g} multiply-adds: {_duration(macs / fastest)} even at "
                         f"{fastest:.0e} a second, about {_duration(macs / typical)} at a typical {typical:.0e}; "
                         f"{advice}")
    if macs / typical > SHOW_SECONDS:
        return f"{what}: at least {macs:.2g} multiply-adds, about {_duration(macs / typical)} at {typical:.0e} a second"
    return None
