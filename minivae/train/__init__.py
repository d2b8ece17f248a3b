"""Training (interim: the names of the former minivae/train.py)."""
from .loop import *  # noqa: F401,F403
from .loop import _Terminated, _DEVICE_STYLE_LOOP  # noqa: F401
