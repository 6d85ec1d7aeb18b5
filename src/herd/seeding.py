"""`set_seed`: one seed for every random number generator generate() and user code may draw from."""

from __future__ import annotations

import random

import numpy as np
import torch


def set_seed(seed: int) -> None:
    """Seed Python's `random`, NumPy and torch (every CUDA device too), as transformers' set_seed does.
    (generate(..., generator=torch.Generator().manual_seed(n)) seeds one call without global state.)"""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
