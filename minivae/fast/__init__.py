"""The fast path: the reference path's numbers, computed for speed.

The core of minivae (layers, gaussian, likelihoods, objectives, conv, networks, model, optim) is the code to
read.  This package computes the same numbers faster and talks to the core only through its public names
(``VAE.encoder_forward``, ``VAE.as_input``, ``Optimizer.begin_step``, ``conv.use_copy_kernels``...).  It is
optional: a course assignment's copy of minivae leaves it out, and everything then runs the core's code.

    trainer.py      FastTrainer: the dense VAE's training step, written once for every device
    ops_numpy.py    the step's elementwise work as NumPy ufuncs (the code the others match)
    ops_numba.py    ... as fused, multi-threaded CPU kernels (numba)
    ops_cupy.py     ... as fused CUDA kernels (CuPy)
    adam.py         Adam over the flat parameter buffer; fused_adam_step for the models FastTrainer skips
    iw.py           the importance log-weights of the evaluation, with fewer logarithms
    conv_copies.py  the conv ops' im2col / col2im copies as fused kernels, installed into minivae.conv
    threads.py      how many threads BLAS and the kernels use: one setting (``--threads``)
    cpu_kernels.py  the numba kernels
    kernels.py      the registry of CUDA kernels (checked with NVRTC without a GPU)

``tests/test_fast.py`` checks every piece against the reference.
"""
from . import threads
from .adam import adam_update_block, fused_adam_step
from .iw import bernoulli_nll_rows, log_weights
from .trainer import SPLIT_MIN_ROWS, FastPathError, FastTrainer, check_supported

__all__ = ["threads", "adam_update_block", "fused_adam_step", "bernoulli_nll_rows", "log_weights",
           "SPLIT_MIN_ROWS", "FastPathError", "FastTrainer", "check_supported"]
