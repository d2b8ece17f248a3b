"""The training loop, as a library function (the CLI's ``train`` only parses flags).

    from minivae.train import TrainSettings, train
    s = TrainSettings.from_recipe("default", epochs=2, n_train=5000)
    history = train(s, "runs/quick")

What a run does
---------------
1. Data: the train and test splits from ``settings.data_dir`` (``$MINIVAE_DATA``
   or the embedded MNIST when None), scaled to [0, 1] and checked once (no NaN
   or inf; inside [0, 1] for a Bernoulli likelihood).  ``n_train``/``n_test``
   keep the first rows only; ``valid`` holds out that many random training
   rows.  Binarization (Bernoulli likelihood):

   * ``dynamic``: every minibatch is re-sampled, x ~ Bernoulli(pixel), each
     time it is used (the usual choice in the likelihood literature);
   * ``static``: the training set is binarized once with ``seed``;
   * ``none``: the grey levels are used as Bernoulli "soft targets".

   The test (and validation) images are binarized once with the fixed seed
   ``test_seed`` (12345), independent of the training seed, so evaluation
   numbers are comparable between runs.
2. Randomness: ``np.random.SeedSequence(seed)`` spawns four independent NumPy
   Generators: ``init`` (weights), ``shuffle`` (minibatch order),
   ``binarize`` (dynamic binarization) and ``eps`` (the reparameterization
   noise, used as ``model.rng``).  Their states are saved in every
   checkpoint, so ``resume=True`` continues bit-for-bit: the same seed and
   backend give the same history on CPU, interrupted or not.
3. Each step: ``model.loss(xb, beta=beta_t, validate=False)`` then
   ``optimizer.step`` (or, where it applies, the fast path's step, :mod:`minivae.fast`: the same numbers,
   checked by the tests; ``fast=False`` turns it off).  The KL warm-up is *per step*:
   ``beta_t = b0 + (beta - b0) * min(1, t / (warmup * steps_per_epoch))`` with t the
   0-based global step and b0 = ``beta_start`` (default 0), so beta moves linearly from b0 (rises from 0,
   or anneals down from a b0 above ``beta``) and reaches ``beta`` at the start of epoch ``warmup + 1``.  The learning rate is set per epoch
   from the recipe's schedule (:func:`minivae.recipes.lr_at_epoch`).
4. Each epoch: one printed line (train and test negative ELBO in nats per
   image, their reconstruction and KL parts, the time), ``history.json`` and
   ``history.csv``, and ``checkpoint.npz``, all written atomically.  The
   train numbers are the averages over the epoch's minibatches as they were
   trained (true ELBO, beta = 1 in the sum, even during warm-up); the test
   numbers use one fixed eps draw (seed ``test_seed``).
5. A NaN or inf loss, or a finite one above ``MAX_LOSS`` (1e6 nats per
   example, far beyond any real model: the untrained default VAE starts at
   about 550), stops the run (:class:`TrainingDiverged`, naming the epoch
   and step) before the bad step is applied or saved; Ctrl-C or SIGTERM
   raises :class:`TrainingInterrupted`.  Either way the last complete
   checkpoint stays on disk, the message names the epoch that is in it, and
   history.json/csv are rewritten from the checkpoint's own record.
6. At the end: ``results.json`` (the final test report, with the
   importance-weighted bound when ``iw_k > 0``), then the figures.

The threads: ``threads`` (``--threads``) sets BLAS's and the fused kernels' thread count for the whole run
(:mod:`minivae.fast.threads`; None: every core, BLAS its own default).  The kernels give the same bits on any
count; BLAS may round a large product differently, so a bit-for-bit rerun uses the same count.

One writer per run folder: the run holds an exclusive lock (``fcntl.flock``
on ``out_dir/.lock``, which names the holder's PID) from start to end, so a
second run or resume into the same folder stops at once with a one-line
error.  Data provenance: the run records the resolved data folder and the
size and SHA-256 of each data file (``settings["data"]``); a resume or an
evaluation reads that same data (from any folder that holds the same files),
or refuses.

``conditional=True`` trains a conditional VAE of p(x|y) on the dataset's labels (an IDX labels file, or
the ``y`` of ``<split>.npz``): the number of classes K is the largest training label + 1, recorded in the
model's config (``n_classes``), and every label must lie in 0..K-1.  Each step is then
``model.loss(xb, y=yb, ...)`` on the readable path (the fast path is unconditional only), and every
reported number is a bound on log p(x|y); the figures add ``class_grid.png``.

The package, one concern a module:

    settings.py     TrainSettings: every field of a run, from a recipe, validated; the resume check
    run_folder.py   the folder: its lock, fresh/stale checks, history.json/csv
    run_data.py     the data: the splits, preprocessed once; a recorded run's data found by fingerprint
    loop.py         train(): the epochs, one step body for every backend, checkpoints, the final report
"""
from __future__ import annotations

from .loop import (CHECK_EVERY, MAX_LOSS, TrainingDiverged, TrainingInterrupted, beta_at, fast_trainer, finish,
                   format_epoch, fused_adam, loss_kwargs, make_rngs, train, using_threads)
from .run_data import (Data, check_split_labels, class_count, evaluation_data, label_kwargs, load_split,
                       run_data_dir)
from .run_folder import (CHECKPOINT, LOCK_FILE, RUN_FILES, RunLock, RunLocked, json_text, new_run_dir,
                         write_history)
from .settings import RESUME_MUTABLE, TEST_SEED, TrainSettings

__all__ = ["CHECK_EVERY", "MAX_LOSS", "TrainingDiverged", "TrainingInterrupted", "beta_at", "fast_trainer",
           "finish", "format_epoch", "fused_adam", "loss_kwargs", "make_rngs", "train", "using_threads", "Data",
           "check_split_labels", "class_count", "evaluation_data", "label_kwargs", "load_split", "run_data_dir",
           "CHECKPOINT", "LOCK_FILE", "RUN_FILES", "RunLock", "RunLocked", "json_text", "new_run_dir",
           "write_history", "RESUME_MUTABLE", "TEST_SEED", "TrainSettings"]
