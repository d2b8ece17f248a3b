"""Command line: ``python -m minivae <command>`` (or the ``minivae`` script).

    train        train a VAE (default: 784-400-20 ReLU, Bernoulli, dynamic binarization,
                 Adam 1e-3, batch 128, 10 epochs, on the embedded MNIST; --recipe conv for the
                 convolutional VAE)
    eval         test negative ELBO (and optionally the importance-weighted bound) of a checkpoint
    sample       an 8x8 grid of samples from the prior (of one digit, --label, for a conditional model)
    interpolate  decodes along a line in latent space between two test digits
    manifold     the 2-D latent manifold and the scatter of latent means (z_dim = 2 only)
    download     fetch a named dataset (mnist, fashion-mnist) into a cache, SHA-256 checked
    lessons      copy the lessons into a folder, as scripts and notebooks
    assignments  make student copies with exercises and grade them (python -m minivae.assignments)

Bad input ends with one line ``minivae: error: ...`` on stderr and exit status
2 (no traceback); a diverged run exits with 1, Ctrl-C with 130, SIGTERM with 143
(128 + the signal number, as a shell reports it), after the same one-line message.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from .backend import BackendError
from .data import DataError

EXIT_ERROR, EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_TERMINATED = 2, 1, 130, 143
BACKENDS = ["numpy", "cupy"]


def _int(text):
    """int('400'), and also int('1e8'): an integer written in float notation (a huge size must reach
    the memory check, not fail as a typo)."""
    try:
        return int(text)
    except ValueError:
        v = float(text)                  # ValueError again if not a number at all
        if not v.is_integer():
            raise ValueError(text) from None
        return int(v)


def _hidden(text):
    try:
        widths = tuple(_int(t) for t in str(text).replace(" ", "").split(",") if t)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"expected widths like 400 or 200,200, got {text!r}") from None
    if not widths or any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(f"expected positive widths like 400 or 200,200, got {text!r}")
    return widths


def _int_at_least(lo, what):
    """An argparse type: an integer >= lo, with a one-line error naming ``what`` was expected."""
    def parse(text):
        try:
            v = _int(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonneg_int = _int_at_least(0, "an integer >= 0")


# flag dest -> TrainSettings field (train flags default to None: "not given", so recipes and resumed
# settings are overridden only by what was typed)
TRAIN_FIELDS = ("arch", "epochs", "batch_size", "hidden", "latent", "activation", "likelihood", "obs_var", "dec_logvar_min", "binarize",
                "beta", "warmup", "lr", "optimizer", "adam_eps", "momentum", "weight_decay", "clip_norm", "seed",
                "backend", "dtype", "valid", "data_dir", "n_train", "n_test", "iw_k", "iwae_k", "free_bits", "threads",
                "conditional", "label_decoder", "label_encoder", "beta_start", "decoder", "flow", "iwae_grad", "prior",
                "stochastic_layers", "latent2", "labels", "alpha")


def build_parser():
    # the choices and their help come from the registries: registering an activation, a likelihood, an
    # architecture, an optimizer or a recipe is all it takes to offer it here
    from . import __version__
    from .config import DTYPES
    from .data import BINARIZE
    from .families import DECODERS
    from .iwae_grads import IWAE_GRADS
    from .layers import ACTIVATIONS
    from .likelihoods import LIKELIHOODS
    from .networks import ARCHITECTURES, LABEL_DECODERS, LABEL_ENCODERS
    from .optim import OPTIMIZERS
    from .recipes import RECIPES
    p = _Parser(prog="minivae", description="Train, evaluate and sample a VAE written in NumPy.")
    p.add_argument("--version", action="version", version=f"minivae {__version__}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    t = sub.add_parser("train", help="train a VAE",
                       description="Train a VAE. Flags override the recipe's fields; with --resume, they override "
                                   "the saved run's (only --epochs, --nll-k, --backend and --no-figures may differ).")
    t.add_argument("--recipe", choices=sorted(RECIPES), default=None, metavar="RECIPE",
                   help="starting settings, one of: " + ", ".join(sorted(RECIPES)) +
                        " (see minivae/recipes.py; without --recipe: default, or conditional with --conditional)")
    t.add_argument("--epochs", type=_nonneg_int, help="passes over the training set (default 10)")
    t.add_argument("--batch-size", type=_positive_int, help="minibatch size (default 128)")
    t.add_argument("--arch", choices=list(ARCHITECTURES),
                   help="network: " + ", ".join(a.summary for a in ARCHITECTURES.values()) + "; " +
                        "; ".join(f"{name} needs image height and width divisible by {a.image_divisor}"
                                  for name, a in ARCHITECTURES.items() if a.image_divisor > 1) + " (default mlp)")
    t.add_argument("--hidden", type=_hidden, help="hidden widths, e.g. 400 or 200,200 (default 400; for conv the "
                                                  "dense layers after the convolutions, default 256)")
    t.add_argument("--latent", type=_positive_int, help="latent dimension z_dim (default 20)")
    t.add_argument("--activation", choices=list(ACTIVATIONS),
                   help="hidden-layer nonlinearity: " + ", ".join(ACTIVATIONS) + " (default relu)")
    t.add_argument("--likelihood", choices=list(LIKELIHOODS),
                   help="p(x|z): " + ", ".join(lik.summary for lik in LIKELIHOODS.values()) + " (default bernoulli)")
    t.add_argument("--obs-var", type=float, help="variance of the fixed-variance Gaussian likelihood (default 1)")
    t.add_argument("--dec-logvar-min", type=float,
                   help="with gaussian_learned_var: floor m on the decoder's log-variance, logvar' = m + "
                        "softplus(logvar - m), so no pixel's variance collapses below exp(m) (default: no floor)")
    t.add_argument("--binarize", choices=list(BINARIZE),
                   help="dynamic: resample x ~ Bernoulli(pixel) each minibatch; static: once, with --seed; none: "
                        "the grey levels, as another likelihood needs (default dynamic)")
    t.add_argument("--beta", type=float, help="weight of the KL term (default 1)")
    t.add_argument("--warmup", type=_nonneg_int,
                   help="KL warm-up epochs: beta rises linearly per step from 0 to --beta over this many epochs "
                        "(default 0: no warm-up)")
    t.add_argument("--beta-start", type=float,
                   help="with --warmup: the KL weight at the first step, moving linearly to --beta (default 0; above "
                        "--beta anneals the weight down)")
    t.add_argument("--lr", type=float, help="learning rate (default 1e-3)")
    t.add_argument("--optimizer", choices=list(OPTIMIZERS),
                   help="update rule: " + ", ".join(OPTIMIZERS) + " (default adam)")
    t.add_argument("--adam-eps", type=float, help="Adam's epsilon, > 0 (default 1e-8)")
    t.add_argument("--momentum", type=float, help="SGD momentum, in [0, 1) (default 0.9)")
    t.add_argument("--weight-decay", type=float, help="L2 penalty coefficient (default 0)")
    t.add_argument("--clip-norm", type=float, help="clip the global gradient norm to this value (default: no "
                                                   "clipping)")
    t.add_argument("--iwae-k", type=_positive_int, metavar="K",
                   help="train on the IWAE bound with K samples (a training objective; --nll-k only evaluates) "
                        "(default: the ELBO)")
    t.add_argument("--iwae-grad", choices=list(IWAE_GRADS),
                   help="with --iwae-k: the encoder's gradient estimator, iwae (the bound's gradient), stl (sticking "
                        "the landing) or dreg (doubly reparameterised); see minivae/iwae_grads.py (default iwae)")
    t.add_argument("--free-bits", type=float, help="free-bits KL floor (nats per latent dimension) (default: none)")
    t.add_argument("--decoder", choices=list(DECODERS),
                   help="p(x|z): factorised (the default) or made, an autoregressive MADE decoder p(x_d | x_<d, z) "
                        "(Bernoulli; see minivae/families.py)")
    t.add_argument("--flow", help="a normalising flow in q(z|x): planar:T (T planar steps) or iaf:T (T inverse "
                                  "autoregressive steps), e.g. planar:4 (default: none)")
    t.add_argument("--stochastic-layers", type=_positive_int, choices=[1, 2],
                   help="2: two stochastic layers z1 (--latent) and z2 (--latent2), the architecture of Burda et al. "
                        "2015 (minivae/twolayer.py; hidden widths halved between z1 and z2) (default 1)")
    t.add_argument("--latent2", type=_positive_int, help="with --stochastic-layers 2: z2's dimension (default: half "
                                                         "of --latent)")
    t.add_argument("--labels", type=_positive_int, metavar="N",
                   help="semi-supervised M2 (Kingma et al. 2014; minivae/m2.py): N labelled training digits, N/K of "
                        "each of the K classes, drawn with --seed; the other digits are unlabelled; eval reports "
                        "the classifier's test error (default: an unsupervised VAE)")
    t.add_argument("--alpha", type=float,
                   help="with --labels: the weight of the classifier's mean cross-entropy per data point; the "
                        "paper's alpha = 0.1 N reads as 0.1 with its expectation a mean over the labelled digits, "
                        "as 0.1 x N labels with it a sum (minivae/m2.py); at most 1e6 (default: labels / 10, the "
                        "sum reading; 0.1 trains poorly, docs/results.md)")
    t.add_argument("--prior", help="a learned prior p(z): mog:C (a mixture of C Gaussians) or vamp:C (the VampPrior, "
                                   "C pseudo-inputs), e.g. vamp:500 (default: N(0, I))")
    t.add_argument("--seed", type=_nonneg_int, help="seed of every random draw of the run (default 0)")
    t.add_argument("--backend", choices=BACKENDS,
                   help="array library: numpy (CPU) or cupy (NVIDIA GPU) (default $MINIVAE_BACKEND or numpy)")
    t.add_argument("--dtype", choices=list(DTYPES),
                   help="float type of parameters and data (default float32; float64 for gradient checks)")
    t.add_argument("--valid", type=_nonneg_int, metavar="N",
                   help="hold out N training images and report the valid loss (default 0)")
    t.add_argument("--data-dir", help="folder of IDX files in the MNIST layout (default $MINIVAE_DATA or the "
                                      "embedded MNIST)")
    t.add_argument("--n-train", type=_positive_int, metavar="N",
                   help="use only the first N training images (default: all)")
    t.add_argument("--n-test", type=_positive_int, metavar="N", help="use only the first N test images (default: all)")
    t.add_argument("--nll-k", "--iw-k", dest="iw_k", type=_nonneg_int, metavar="K",
                   help="after training, also estimate the test NLL by importance weighting with K samples "
                        "(evaluates only; --iwae-k trains) (default 0: no estimate)")
    t.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    t.add_argument("--conditional", action="store_true", default=None,
                   help="a conditional VAE of p(x|y) on the dataset's labels (the number of classes is read from "
                        "them); without --recipe, the conditional recipe (minivae/recipes.py); writes class_grid.png")
    t.add_argument("--label-decoder", choices=list(LABEL_DECODERS),
                   help="with --conditional, how the decoder reads the label: " +
                        "; ".join(f"{k}: {v}" for k, v in LABEL_DECODERS.items()) +
                        " (default: the recipe's; outer in the conditional recipe, input in the others)")
    t.add_argument("--label-encoder", choices=list(LABEL_ENCODERS),
                   help="with --conditional, how the encoder reads the label: " +
                        "; ".join(f"{k}: {v}" for k, v in LABEL_ENCODERS.items()) + " (default: the recipe's)")
    t.add_argument("--reference-path", action="store_true",
                   help="train with the readable model.loss + optimizer.step instead of the optimized minivae.fast "
                        "step (same math, slower)")
    _threads_flag(t)
    t.add_argument("--out", help="run folder, locked while the run writes to it (default: a new folder "
                                 "runs/<recipe>-<date>-<time>-<microseconds>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    t.add_argument("--force", action="store_true",
                   help="start a new run in an --out folder that already holds files, replacing the run's files")
    t.add_argument("--quiet", action="store_true",
                   help="no progress bars: only the header line, one line per epoch and the final report")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="test negative ELBO of a checkpoint",
                       description="Print the test negative ELBO and its parts, the active units and the KL of "
                                   "each latent dimension (the test set is binarized once with a fixed seed, so "
                                   "numbers compare between runs).")
    _ckpt_args(e)
    e.add_argument("--nll-k", "--iw-k", dest="iw_k", type=_nonneg_int, default=0, metavar="K",
                   help="also estimate the test NLL -log p(x) by importance weighting with K samples per image "
                        "(evaluates only; --iwae-k of train is a training objective) (default 0: no estimate)")
    e.add_argument("--n", type=_positive_int, help="evaluate the first N test images only (active units are "
                                                     "counted from 20 images up) (default: all)")
    e.add_argument("--label-accuracy", action="store_true",
                   help="a conditional model: the fraction of 1000 prior samples (100 per label) that a pixel "
                        "classifier trained on the real training digits recognises as their label, with its own "
                        "accuracy on the real test digits (the classifier is trained once and cached in the run "
                        "folder as judge.npz)")
    e.add_argument("--json", metavar="FILE",
                   help="also write the numbers as JSON to FILE, or with '-' print only the JSON, on stdout "
                        "(strict JSON: null for a missing number) (default: no JSON)")
    _threads_flag(e)
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("sample", help="an 8x8 grid of samples from the prior",
                       description="Draw z from the model's prior (N(0, I), a learned prior's p(z), z1 ~ p(z1|z2) "
                                   "with two stochastic layers) and save E[x|z] in a new file: a grid picture (.png) "
                                   "for up to 1024 samples, else an .npz (array x of shape (N, D)), written in chunks "
                                   "so memory stays bounded whatever N is. An existing file is never replaced "
                                   "unless --out names it.")
    _ckpt_args(s)
    s.add_argument("--out", metavar="PATH",
                   help="a file (name.png, or name.npz above 1024 samples), written as named; or a folder, which "
                        "gets a new samples.png, or samples-2.png, -3... when the name is taken (default: the run's "
                        "figures/ folder)")
    s.add_argument("--n", type=_positive_int, default=64, help="number of samples (default 64)")
    s.add_argument("--seed", type=_nonneg_int, default=0, help="seed of the z draws (default 0)")
    s.add_argument("--label", type=_nonneg_int,
                   help="the class to draw (a conditional model: required; M2, trained with --labels: optional, "
                        "by default each sample's class is drawn from p(y))")
    _threads_flag(s)
    s.set_defaults(func=cmd_sample)

    i = sub.add_parser("interpolate", help="decode a line in latent space between two test digits",
                       description="Encode two test digits, and decode evenly spaced points on the line between "
                                   "their posterior means (interpolation.png).")
    _ckpt_args(i)
    i.add_argument("--out", help="output folder (default: the checkpoint's figures/ folder)")
    i.add_argument("--a", type=_nonneg_int, default=0, help="index of the first test digit (default 0)")
    i.add_argument("--b", type=_nonneg_int, default=None,
                   help="index of the second test digit (default: the first with another label)")
    i.add_argument("--steps", type=_positive_int, default=10,
                   help="points decoded between the two digits, at most 100 (default 10)")
    i.set_defaults(func=cmd_interpolate)

    m = sub.add_parser("manifold", help="2-D latent manifold and latent scatter (z_dim = 2)",
                       description="For a model with a 2-D latent space: decodes on a grid of z (manifold.png) "
                                   "and the posterior means of test digits coloured by label (latent_scatter.png).")
    _ckpt_args(m)
    m.add_argument("--out", help="output folder (default: the checkpoint's figures/ folder)")
    m.add_argument("--grid", type=_positive_int, default=20, help="grid size, at most 100 (default 20)")
    m.add_argument("--label", type=_nonneg_int, help="a conditional model or M2: decode the grid with this label "
                                                     "(default 0)")
    m.set_defaults(func=cmd_manifold)

    d = sub.add_parser("download", help="download a named dataset into a cache, checking SHA-256",
                       description="Download a named dataset (mnist, fashion-mnist) into a cache folder; each file "
                                   "is kept only if its SHA-256 is the registry's.")
    d.add_argument("name", help="dataset: mnist or fashion-mnist")
    d.add_argument("--cache", help="cache folder (default $MINIVAE_CACHE or ~/.cache/minivae)")
    d.add_argument("--url", help="base URL replacing the registry's (a mirror)")
    d.set_defaults(func=cmd_download)

    les = sub.add_parser("lessons", help="copy the lessons into a folder, as scripts and notebooks",
                         description="Copy every lesson into DIR as a percent-format script (NN_name.py) and "
                                     "as a Jupyter notebook (NN_name.ipynb), with the lessons' README. DIR must "
                                     "be new or empty.")
    les.add_argument("dir", metavar="DIR", help="a new or empty folder")
    les.set_defaults(func=cmd_lessons)

    asg = sub.add_parser("assignments", add_help=False,
                         description="The assignments tool: make OUT_DIR writes a student copy with exercise "
                                     "stubs, grade SUBMISSION... grades submissions, list lists the exercises; "
                                     "python -m minivae assignments --help for its options.",
                         help="make student copies with exercises and grade them (make, grade, list; "
                              "the same as python -m minivae.assignments)")
    asg.add_argument("args", nargs=argparse.REMAINDER, help="make OUT_DIR | grade SUBMISSION... | list | --help")
    asg.set_defaults(func=cmd_assignments)
    return p


def _threads_flag(p):
    p.add_argument("--threads", type=_positive_int, metavar="N",
                   help="threads for BLAS and the fused kernels, any N >= 1 (default: every core); another N "
                        "can change the last bits of BLAS's products")


def _ckpt_args(p):
    p.add_argument("run", nargs="?", metavar="RUN",
                   help="a run folder, its checkpoint.npz, or 'latest' (runs/latest, the newest run in runs/)")
    p.add_argument("--checkpoint", metavar="RUN", help="the same as RUN")
    p.add_argument("--data-dir", metavar="DIR", help="test data folder (default: the one the run was trained on; "
                                                     "another folder must hold the same files)")
    p.add_argument("--backend", choices=BACKENDS,
                   help="array library: numpy or cupy (default $MINIVAE_BACKEND or numpy)")


# ------------------------------------------------------------------- commands
def _backend(args):
    """--backend, else $MINIVAE_BACKEND, else numpy (an unknown name is a one-line BackendError)."""
    from .backend import _check_name
    if args.backend is not None:
        return args.backend
    env = os.environ.get("MINIVAE_BACKEND", "").strip().lower()
    return _check_name(env) if env else "numpy"


def cmd_train(args):
    from .checkpoint import CheckpointError, load_checkpoint
    from .train import CHECKPOINT, TrainSettings, new_run_dir, train
    from .train.settings import upgrade_saved
    overrides = {k: getattr(args, k) for k in TRAIN_FIELDS if getattr(args, k) is not None}
    if args.backend is None and os.environ.get("MINIVAE_BACKEND", "").strip():
        overrides["backend"] = _backend(args)
    if args.no_figures:
        overrides["figures"] = False
    if args.reference_path:
        overrides["fast"] = False
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} exists and is not a folder; a run writes a folder of files")
    if args.resume:
        if not args.out:
            raise ValueError("--resume needs --out DIR, the folder of the run to continue")
        if not (Path(args.out) / CHECKPOINT).exists():
            from .train.run_folder import missing_checkpoint
            raise missing_checkpoint(args.out)
        ckpt = load_checkpoint(Path(args.out) / CHECKPOINT)
        saved = upgrade_saved(ckpt.settings)
        try:                                 # the file's own settings, before this command's flags change any
            TrainSettings.from_saved(dict(saved)).validate()
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{ckpt.path}: invalid field settings ({_one_line(exc)})") from None
        if args.recipe is not None and args.recipe != saved.get("recipe"):
            raise ValueError(f"{ckpt.path} was trained with recipe {saved.get('recipe')!r}, not {args.recipe!r}")
        saved.update(overrides)
        try:
            settings = TrainSettings.from_saved(saved)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{ckpt.path}: corrupt field settings ({_one_line(exc)})") from None
    else:
        # --conditional without --recipe: the conditional recipe (minivae.recipes), the one measured to draw the
        # digit it is asked for
        settings = TrainSettings.from_recipe(args.recipe or ("conditional" if args.conditional else "default"),
                                             **overrides)
    settings.validate()                      # before a default folder is created
    out = args.out or str(new_run_dir(RUNS, settings.recipe))
    old_latest = _point_latest_at(out)       # runs/latest: the newest run
    t0 = time.perf_counter()
    try:
        history = train(settings, out, resume=args.resume, progress=not args.quiet, force=args.force)
    except BaseException:
        if not args.out:                     # a default folder (ours alone) that got nothing is not left behind
            from .train import LOCK_FILE
            if sorted(os.listdir(out)) in ([], [LOCK_FILE]):
                try:
                    if os.path.exists(os.path.join(out, LOCK_FILE)):
                        os.unlink(os.path.join(out, LOCK_FILE))
                    os.rmdir(out)
                except OSError:
                    pass
                _restore_latest(out, old_latest)
        raise
    print(f"done: {len(history)} epochs in {out} ({time.perf_counter() - t0:.1f}s this session)")
    return 0


RUNS, LATEST = "runs", "latest"


def _run_path(args):
    """The checkpoint to read: RUN or --checkpoint (one of them), where 'latest' means runs/latest."""
    if args.run is not None and args.checkpoint is not None and args.run != args.checkpoint:
        raise ValueError(f"give the run once, as RUN or as --checkpoint (got {args.run!r} and {args.checkpoint!r})")
    path = args.run if args.run is not None else args.checkpoint
    if path is None:
        raise ValueError(f"which run? give RUN: a run folder, its checkpoint.npz, or {LATEST} (the newest in {RUNS}/)")
    if path == LATEST and not os.path.exists(LATEST):
        path = os.path.join(RUNS, LATEST)
        if not os.path.exists(path):
            raise ValueError(f"no {path} here: train a run first (python -m minivae train), or name a run folder")
    return path


def _point_latest_at(out):
    """Make runs/latest a link to the run folder ``out`` when ``out`` is in runs/; return the link's old target.

    The link is relative (it survives moving runs/) and replaced atomically; where links cannot be made, or
    runs/latest is not a link, nothing changes (returns False)."""
    out = Path(out)
    runs = Path(RUNS)
    if not runs.is_dir() or out.resolve().parent != runs.resolve():
        return False
    target = out.resolve().name        # the folder itself: --out runs/latest (a resume) must not link latest to itself
    link = runs / LATEST
    if link.exists() and not link.is_symlink():
        return False                             # a run folder someone named 'latest': never touched
    old = os.readlink(link) if link.is_symlink() else None
    tmp = runs / f".{LATEST}-{os.getpid()}"
    try:
        if tmp.is_symlink():
            tmp.unlink()
        os.symlink(target, tmp)
        os.replace(tmp, link)
    except OSError:
        return False
    return old


def _restore_latest(out, old):
    """Point runs/latest back at ``old`` (None: remove it) if it still points at the removed folder ``out``."""
    link = Path(RUNS) / LATEST
    if old is False or not link.is_symlink() or os.readlink(link) != Path(out).name:
        return
    try:
        link.unlink()
        if old is not None:
            os.symlink(old, link)
    except OSError:
        pass


def _load(args):
    from .checkpoint import CheckpointError, load_checkpoint
    from .train import TrainSettings
    ckpt = load_checkpoint(_run_path(args))
    from .train.run_folder import removed_line, tidy_run_folder
    run = Path(ckpt.path).parent                 # a killed writer's temporary files go, if no run holds the folder
    line = removed_line(run, tidy_run_folder(run))
    if line:
        print(f"minivae: {line}", file=sys.stderr)
    try:
        settings = TrainSettings.from_saved(ckpt.settings) if ckpt.settings else TrainSettings()
        settings.validate()
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{ckpt.path}: invalid field settings ({_one_line(exc)})") from None
    model = ckpt.build_model(_backend(args))
    return ckpt, settings, model


def _test_data(args, ckpt, settings, n=None):
    from .checkpoint import CheckpointError
    from .train import evaluation_data
    x_eval, x_grey, y = evaluation_data(settings, data_dir=args.data_dir, n=n, where=str(ckpt.path))
    if x_eval.shape[1] != ckpt.config.x_dim:
        raise CheckpointError(f"{ckpt.path}: the model expects {ckpt.config.x_dim} values per image, the test "
                              f"data has {x_eval.shape[1]}")
    if ckpt.config.image_shape is not None:
        from .data import image_shape
        shape = image_shape(args.data_dir if args.data_dir is not None else settings.data_dir, "test")
        if shape is not None and shape != ckpt.config.image_shape:
            raise CheckpointError(f"{ckpt.path}: the model expects images of shape {ckpt.config.image_shape}, "
                                  f"the test data has {shape}")
    if ckpt.config.n_classes is not None:
        from .data import default_data_dir
        from .train import check_split_labels
        src = args.data_dir or settings.data_dir or default_data_dir()
        check_split_labels(y, ckpt.config.n_classes, f"{src} (test labels for a model of "
                                                     f"{ckpt.config.n_classes} classes)")
    return x_eval, x_grey, y


def _out_dir(args, ckpt):
    return Path(args.out) if args.out else Path(ckpt.path).parent / "figures"


def _check_output(path, flag, args, ckpt, settings=None):
    """``path``, unless it is a file this command reads or its run's own record (the checkpoint, a data file,
    the run folder's settings/results/history/lock/judge files): a one-line refusal."""
    from .atomic import check_not_input
    from .judge import JUDGE_FILE
    from .train.run_folder import LOCK_FILE, RUN_FILES
    run = Path(ckpt.path).parent
    inputs = [ckpt.path] + [run / name for name in RUN_FILES + (LOCK_FILE, JUDGE_FILE) if name != "figures"]
    data = getattr(args, "data_dir", None) or (settings.data_dir if settings is not None else None) or \
        (ckpt.settings.get("data_dir") if isinstance(ckpt.settings, dict) else None)
    if data and Path(data).is_dir():
        inputs += [p for p in Path(data).iterdir() if p.is_file()]
    return Path(check_not_input(path, inputs, flag))


def _check_parent(path, flag):
    """``path``, a file the user named, unless its folder does not exist: a one-line refusal (a typo in the folder
    must not create a chain of folders).  Folders a command owns (a run's figures/, ``--out DIR``) are made."""
    parent = Path(path).parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: the folder {parent} does not exist (create it first, or check the path)")
    return path


def _check_sample_size(n, model, target):
    """sample --n: refused before anything is drawn when its file cannot fit on the disk or its decoding cannot
    finish (minivae.limits); a long but feasible one shows its estimate."""
    from . import limits
    limits.check_disk(limits.sample_file_bytes(model.config, n), target.parent, f"sample --n {n}",
                      "choose a smaller --n")
    _note(limits.check_work(n * limits.weights(model.config, "dec."), f"sample --n {n}", "choose a smaller --n",
                            model.backend if isinstance(getattr(model, "backend", None), str) else "numpy"))


def _note(note):
    if note:
        print(f"minivae: estimate: {note}", file=sys.stderr)


class ModelOverflow(ValueError):
    """A checkpoint whose numbers are finite but so large that computing with them overflows (its weights
    scaled by 1e30, say): ``eval`` gets a non-finite bound, ``sample``/``interpolate``/``manifold`` would draw
    NaN or saturated pictures.  One line naming the checkpoint, the computation and the first non-finite value;
    the NumPy warnings that led here are not repeated after it (this line says what they meant)."""

    def __init__(self, ckpt, what, value):
        super().__init__(f"{ckpt.path}: the {what} gave a non-finite {value}; the model overflows on this data "
                         "(its weights are too large to compute with)")


@contextlib.contextmanager
def refusing_overflow(ckpt, what):
    """Run a command's model arithmetic with NumPy's overflow and invalid-value warnings raised as errors, so a
    checkpoint that overflows (:class:`ModelOverflow`) is refused before a picture or file is written, instead of
    a picture of NaN (or of logits that overflowed to +-inf and saturated) with RuntimeWarnings.  The commands that
    draw their output through it: sample, interpolate, manifold (eval checks its bound for the same reason)."""
    with np.errstate(over="raise", invalid="raise"):
        try:
            yield
        except FloatingPointError as exc:
            raise ModelOverflow(ckpt, what, f"value ({exc})") from None


def cmd_eval(args):
    import math

    from . import evaluate
    from .train import json_text
    ckpt, settings, model = _load(args)
    if args.label_accuracy and model.config.n_classes is None:
        raise ValueError(f"--label-accuracy needs a conditional model; {ckpt.path} is unconditional (train with "
                         "--conditional)")
    if args.n is None:
        settings.n_test = None          # the whole test set unless --n
    x_eval, _, y = _test_data(args, ckpt, settings, n=args.n)
    if args.json and args.json != "-":
        _check_output(_check_parent(args.json, "--json"), "--json", args, ckpt, settings)
    if args.iw_k:
        from . import limits
        _note(limits.check_work(limits.iw_macs(model.config, len(x_eval), args.iw_k),
                                f"eval --nll-k {args.iw_k} on {len(x_eval)} images", "choose a smaller --nll-k or --n",
                                _backend(args)))
    from .train import label_kwargs
    rep = evaluate.report(model, x_eval, np.random.default_rng(settings.test_seed), iw_k=args.iw_k, progress=True,
                          **label_kwargs(model, y))
    if getattr(model, "semi_supervised", False):            # M2: the test classification error of q(y|x)
        from .train import check_split_labels
        check_split_labels(y, model.config.classes, f"{args.data_dir or settings.data_dir} (test labels for M2 "
                                                    f"of {model.config.classes} classes)")
        rep["error"] = model.error_rate(x_eval, y)
    bad = [k for k in ("neg_elbo", "recon", "kl", "iw_nll") if rep.get(k) is not None and not math.isfinite(rep[k])]
    if bad:
        raise ModelOverflow(ckpt, "evaluation", f"{bad[0]} ({rep[bad[0]]})")
    if args.json == "-":                         # for machines: the JSON alone, on stdout
        if args.label_accuracy:
            with contextlib.redirect_stdout(sys.stderr):
                rep["label_accuracy"] = _label_accuracy(args, ckpt, settings, model)
        print(json_text(dict(rep, checkpoint=str(ckpt.path), epoch=ckpt.epoch)), end="")
        return 0
    for line in eval_lines(rep, ckpt, model):
        print(line)
    if args.label_accuracy:
        rep["label_accuracy"] = _label_accuracy(args, ckpt, settings, model)
    if args.json:
        from .checkpoint import atomic_write
        doc = dict(rep, checkpoint=str(ckpt.path), epoch=ckpt.epoch)
        atomic_write(args.json, lambda f: f.write(json_text(doc)), mode="w")
        print(f"wrote {args.json}")
    return 0


def eval_lines(rep, ckpt, model):
    """The lines ``eval`` prints for people: each number with its name and unit (``--json`` has the raw keys)."""
    px = "p(x|y)" if model.config.n_classes is not None else "p(x)"
    lines = [f"{ckpt.path} (epoch {ckpt.epoch}, {model!r})",
             f"test -ELBO (a bound on -log {px}): {rep['neg_elbo']:.4f} nats/image (reconstruction "
             f"{rep['recon']:.4f} + KL {rep['kl']:.4f}), {rep['n']} images"]
    if rep.get("iw_nll") is not None:
        sem = f" +- {rep['iw_nll_sem']:.4f}" if rep.get("iw_nll_sem") is not None else ""
        how = " per class, the classes summed" if getattr(model, "semi_supervised", False) else ""   # M2: log_weights
        lines.append(f"test NLL -log {px}, importance-weighted with k = {rep['iw_k']}{how}: {rep['iw_nll']:.4f}{sem} "
                     f"nats/image ({rep['iw_seconds']:.1f} s)")
    if rep.get("error") is not None:
        lines.append(f"test classification error of q(y|x): {100 * rep['error']:.2f}% ({rep['n']} images)")
    layers = rep.get("latent_layers")              # two stochastic layers: {"z1": L1, "z2": L2}
    if rep.get("active_units") is not None and layers:
        lines.append(f"active latent units: {rep['active_units']} of {rep['n_latent']}: z1 {rep['active_units_z1']} "
                     f"of {layers['z1']}, z2 {rep['active_units_z2']} of {layers['z2']} (Cov_x E_q[z_j] > "
                     f"{rep['au_threshold']:g}; z2's mean at z1 = E_q[z1|x])")
    elif rep.get("active_units") is not None:
        lines.append(f"active latent units: {rep['active_units']} of {rep['n_latent']} (Cov_x E_q[z_j] > "
                     f"{rep['au_threshold']:g})")
    if rep.get("kl_per_dim") is not None and layers:
        per, L1 = rep["kl_per_dim"], layers["z1"]
        lines.append(f"KL term per latent unit, each unit's share of the KL {rep['kl']:.4f} above (nats; the same "
                     f"Monte Carlo draws; the {len(per)} shares sum to it):")
        lines.append(f"  z1, log q(z1_j|x) - log p(z1_j|z2), sum {sum(per[:L1]):.4f}: "
                     + " ".join(f"{v:.2f}" for v in per[:L1]))
        lines.append(f"  z2, log q(z2_j|z1) - log p(z2_j), sum {sum(per[L1:]):.4f}: "
                     + " ".join(f"{v:.2f}" for v in per[L1:]))
    elif rep.get("kl_per_dim") is not None:
        lines.append("KL per latent dimension (nats): " + " ".join(f"{v:.2f}" for v in rep["kl_per_dim"]))
    for note in ("au_note", "kl_note"):
        if rep.get(note):
            lines.append(f"note: {rep[note]}")
    if isinstance(rep.get("collapse_warning"), str):
        lines.append(f"warning: {rep['collapse_warning']}")
    return lines


def _label_accuracy(args, ckpt, settings, model):
    """Print (and return) the judge's verdicts on 100 prior samples per label (minivae.judge)."""
    from .data import default_data_dir
    from .judge import JUDGE_FILE, describe, label_accuracy, load_or_train
    run_dir = Path(ckpt.path).parent
    cached = (run_dir / JUDGE_FILE).exists()
    judge = load_or_train(run_dir, args.data_dir or settings.data_dir or default_data_dir())
    acc = label_accuracy(model, judge, n_per_label=100, seed=0)
    print(f"label accuracy: {100 * acc['overall']:.1f}% of {acc['n']} prior samples (100 per label) recognised "
          f"as their label (worst: label {acc['worst_label']}, {100 * acc['worst']:.0f}%)")
    print("  per label: " + " ".join(f"{k}:{100 * v:.0f}%" for k, v in enumerate(acc["per_label"])))
    print(f"  {describe(judge)} ({'cached' if cached else 'trained now'}: {run_dir / JUDGE_FILE})")
    return dict(acc, judge_test_accuracy=judge.test_accuracy, judge=str(run_dir / JUDGE_FILE))


def cmd_sample(args):
    from . import figures
    ckpt, _, model = _load(args)
    rng = np.random.default_rng(args.seed)
    n_classes = figures.label_classes(model)     # M2's too: without --label it draws each class from p(y)
    if n_classes is None and args.label is not None:
        raise ValueError(f"--label needs a conditional model or M2; {ckpt.path} is unconditional (train with "
                         "--conditional or --labels N)")
    if n_classes is not None and ((args.label is None and model.config.n_classes is not None) or
                                  (args.label is not None and args.label >= n_classes)):
        kind = "a conditional model" if model.config.n_classes is not None else "M2"
        raise ValueError(f"{ckpt.path} is {kind} of {n_classes} classes: give --label 0..{n_classes - 1}"
                         + ("" if args.label is None else f" (got {args.label})"))
    stem = "samples" if args.label is None else f"samples_label{args.label}"
    suffix = ".npz" if args.n > figures.MAX_PICTURE else ".png"      # too many for a picture: an .npz
    path = sample_path(args.out, Path(ckpt.path).parent / "figures", stem, suffix)
    if args.out is not None and path == Path(args.out):        # a file named by --out: its folder must exist
        _check_parent(path, "--out")
    path = _check_output(path, "--out", args, ckpt)          # never over the checkpoint or a data file
    if suffix == ".npz":                         # written chunk by chunk
        _check_sample_size(args.n, model, path)
        with refusing_overflow(ckpt, "sampling"):
            path = figures.save_samples_npz(model, path, rng, args.n, y=args.label, progress=True)
        print(f"wrote {path} ({args.n} samples, more than the {figures.MAX_PICTURE} a picture shows; "
              "np.load(path)['x'] has shape (N, D))")
        return 0
    nrow = int(np.ceil(np.sqrt(args.n)))
    with refusing_overflow(ckpt, "sampling"):
        path = figures.prior_samples(model, path, rng, n=args.n, nrow=nrow, y=args.label)
    print(f"wrote {path}")
    return 0


def sample_path(out, default_folder, stem, suffix):
    """Where ``sample`` writes: ``out`` itself when it names a file (it ends in .png or .npz, which must be
    ``suffix``), else a new file ``stem.suffix``, ``stem-2.suffix``... in the folder ``out`` (default: the run's
    figures/), so an existing picture is never replaced unless asked for by name."""
    if out is not None and Path(out).suffix.lower() in (".png", ".npz") and not Path(out).is_dir():
        if Path(out).suffix.lower() != suffix:
            what = "a picture (.png) of at most 1024" if suffix == ".png" else "an .npz above 1024"
            raise ValueError(f"--out {out}: these samples are written as {what} samples; name a {suffix} "
                             "file or a folder")
        return Path(out)
    folder = Path(out) if out is not None else Path(default_folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder (a file to write must end in {suffix})")
    for i in range(1, 100000):
        path = folder / (stem + (f"-{i}" if i > 1 else "") + suffix)
        if not path.exists():
            return path
    raise ValueError(f"{folder}: no free name for {stem}{suffix}")


def cmd_interpolate(args):
    from . import figures
    if args.steps > figures.MAX_GRID:
        raise ValueError(f"--steps is at most {figures.MAX_GRID}, got {args.steps}")
    ckpt, settings, model = _load(args)
    _, x, y = _test_data(args, ckpt, settings)
    a = args.a
    b = args.b
    conditional = figures.label_classes(model) is not None     # M2 too: its decoder reads the class
    for flag, idx in (("--a", a), ("--b", b)):
        if idx is not None and idx >= len(x):
            raise ValueError(f"{flag} {idx} is out of range: the test set has {len(x)} images (indices 0.."
                             f"{len(x) - 1})")
    if b is None:                   # a conditional model decodes one label: the first other digit with a's label
        others = np.flatnonzero((y == y[a]) if conditional else (y != y[a])) if a < len(y) else []
        others = others[others != a]
        b = int(others[0]) if len(others) else (a + 1)
    for idx in (a, b):
        if idx >= len(x):
            raise ValueError(f"test index {idx} is out of range (the test set has {len(x)} images)")
    if conditional and y[a] != y[b]:
        raise ValueError(f"a model that reads labels (conditional, M2) interpolates between two digits of one "
                         f"label; test images {a} and "
                         f"{b} have labels {y[a]} and {y[b]}")
    target = _check_output(_out_dir(args, ckpt) / "interpolation.png", "--out", args, ckpt, settings)
    with refusing_overflow(ckpt, "interpolation"):
        path = figures.interpolation(model, x[[a]], x[[b]], target, steps=args.steps,
                                     y=y[[a]] if conditional else None)
    print(f"wrote {path}")
    return 0


def cmd_manifold(args):
    from . import figures
    if args.grid > figures.MAX_GRID:
        raise ValueError(f"--grid is at most {figures.MAX_GRID} (a {figures.MAX_GRID}x{figures.MAX_GRID} picture "
                         f"is already {figures.MAX_GRID * 29} pixels wide), got {args.grid}")
    ckpt, settings, model = _load(args)
    if hasattr(model, "L2"):                     # two stochastic layers: the decoder reads z1 alone
        raise ValueError(figures.two_layer_manifold_refusal(model, str(ckpt.path)))
    if model.config.z_dim != 2:
        raise ValueError(f"manifold needs a model with a 2-D latent space; {ckpt.path} has z_dim="
                         f"{model.config.z_dim} (train with --latent 2)")
    out = _out_dir(args, ckpt)
    n_classes = figures.label_classes(model)     # a conditional model's or M2's
    if args.label is not None and (n_classes is None or args.label >= n_classes):
        raise ValueError(f"--label {args.label} needs a conditional model or M2 with more than {args.label} classes; "
                         f"{ckpt.path} has " + ("no labels" if n_classes is None else f"{n_classes} classes"))
    label = (args.label or 0) if n_classes is not None else None
    targets = [_check_output(out / name, "--out", args, ckpt, settings) for name in ("manifold.png",
                                                                                    "latent_scatter.png")]
    _, x, y = _test_data(args, ckpt, settings)
    with refusing_overflow(ckpt, "manifold decoding"):
        p1 = figures.manifold(model, targets[0], n=args.grid, y=label)
        p2 = figures.latent_scatter(model, x[:5000], y[:5000], targets[1])
    print(f"wrote {p1}\nwrote {p2}")
    return 0


def cmd_download(args):
    from .download import download
    folder = download(args.name, args.cache, base_url=args.url, progress=print)
    print(f"{args.name} is in {folder}; train on it with: python -m minivae train --data-dir {folder}")
    return 0


def cmd_lessons(args):
    from .lessonfiles import export_lessons
    written = export_lessons(args.dir)
    n = sum(p.suffix == ".ipynb" for p in written)
    print(f"wrote {n} lessons to {args.dir} as .py scripts and .ipynb notebooks (open them in Jupyter or VS Code)")
    return 0


def cmd_assignments(args):
    try:
        from .assignments.__main__ import main as assignments_main
    except ImportError:
        raise ValueError("this copy of minivae has no assignments tool (a student's copy leaves out the grader)") \
            from None
    return assignments_main(args.args)


# ----------------------------------------------------------------------- main
def _one_line(exc):
    return " ".join(str(exc).split()) or type(exc).__name__


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad flag refused in one line like every other error (its subcommands' parsers are of this
    class too); the usage block is what --help is for."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv=None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if argv[:1] == ["assignments"]:              # every later word is the assignments tool's, --help included
        args = argparse.Namespace(func=cmd_assignments, args=argv[1:])
    else:
        args = parser.parse_args(argv)
    if args.func is cmd_assignments:             # its own tool, with its own output (and warnings)
        code, line = _run(args)
        if line is not None:
            print(line, file=sys.stderr)
        return code
    # warnings (NumPy's RuntimeWarnings before a divergence, ...) are collected: an error folds them into its
    # one line; a command that succeeds prints each once at the end, one line each
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        code, line = _run(args)
    if line is None and code != EXIT_PIPE:
        try:                                      # a pipe closed after the last line: stop as above
            sys.stdout.flush()
        except BrokenPipeError:
            code = _stdout_closed()
    if isinstance(line, _Explained):              # the line says what the warnings meant: not repeated
        caught = []
    seen = []
    for w in caught:
        text = f"{w.category.__name__}: {_one_line(w.message)}"
        if text not in seen:
            seen.append(text)
    if line is not None:
        if seen:
            more = f" and {len(seen) - 1} more" if len(seen) > 1 else ""
            line += f" (after the warning {seen[0]}{more})"
        print(line, file=sys.stderr)
    else:
        for text in seen:
            print(f"minivae: warning: {text}", file=sys.stderr)
    return code


EXIT_PIPE = 128 + signal.SIGPIPE      # what a shell reports for a program that a closed pipe stopped


def _stdout_closed():
    """Point stdout at /dev/null, so that the interpreter's last flush finds no closed pipe (which Python reports
    as "Exception ignored ... BrokenPipeError" on stderr), and return the exit status of a program a pipe stopped."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):      # stdout replaced by an object without a file (tests)
        pass
    return EXIT_PIPE


class _Explained(str):
    """An error line that already says what the warnings before it meant (a ModelOverflow): main prints it alone."""


def _run(args):
    """Run the command: (exit status, None) on success, else (status, the one line that says why)."""
    from .checkpoint import CheckpointError
    from .download import DownloadError
    from .train import RunLocked, TrainingDiverged, using_threads
    from . import signals
    try:
        # every command: Ctrl-C and SIGTERM unwind as one exception (temporary files removed), even one whose
        # first exception a library swallowed (signals.check, at the end), and end in one line, exit 130/143
        with signals.handled():
            with using_threads(getattr(args, "threads", None)):      # --threads of train, eval and sample
                code = int(args.func(args) or 0)
            signals.check()
        return code, None
    except KeyboardInterrupt as exc:
        terminated = signals.signal_of(exc) == signal.SIGTERM
        command = getattr(args, "command", None) or "minivae"
        default = (f"{command} terminated (SIGTERM)" if terminated else f"{command} interrupted (Ctrl-C)") \
            + "; no file was left half-written"
        return (EXIT_TERMINATED if terminated else EXIT_INTERRUPTED), \
            f"minivae: {_one_line(exc) if str(exc) else default}"
    except TrainingDiverged as exc:
        return EXIT_DIVERGED, f"minivae: error: {_one_line(exc)}"
    except ModelOverflow as exc:
        return EXIT_ERROR, _Explained(f"minivae: error: {_one_line(exc)}")
    except BrokenPipeError:
        # the reader of our output went away (eval | head): stop quietly, as cat or grep do, and say nothing
        return _stdout_closed(), None
    except (CheckpointError, DataError, DownloadError, BackendError, RunLocked, ValueError, FileNotFoundError,
            OSError) as exc:
        return EXIT_ERROR, f"minivae: error: {_one_line(exc)}"
    except MemoryError:
        return EXIT_ERROR, "minivae: error: out of memory (the request is larger than this machine's memory)"

if __name__ == "__main__":
    sys.exit(main())
