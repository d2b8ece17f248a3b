"""The fast path (interim: the names of the former minivae/fast.py)."""
from .trainer import *  # noqa: F401,F403
from .trainer import (FastPathError, FastTrainer, SPLIT_MIN_ROWS, _cpu_kernels, _find_blas_threads,  # noqa: F401
                      _set_blas_threads, _scratch, _rows_on_two_threads, _bias_tanh, _exp_inplace)
