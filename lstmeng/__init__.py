"""lstmeng: one LSTM API with Keras's semantics on the fastest backend the machine has.

Example:
    >>> import numpy as np, lstmeng as le
    >>> model = le.Sequential([le.Bidirectional(le.LSTM(8, return_sequences=True, seed=0)), le.LSTM(4, seed=1)])
    >>> x, mask = le.pad_batch([np.ones((5, 3)), np.ones((2, 3))])
    >>> model(x, mask=mask).shape
    (2, 4)
"""

from lstmeng import (
    losses,
    optim,  # NumPy only: numba is imported when a device array is met
)
from lstmeng.backends.registry import (
    BackendInfo,
    get_backend,
    list_backends,
    set_backend,
    use_backend,
)
from lstmeng.bidirectional import Bidirectional
from lstmeng.cell import LSTMCell
from lstmeng.conversion import from_keras, from_torch
from lstmeng.dense import Dense, Embedding
from lstmeng.dropout import Dropout
from lstmeng.layers import LSTM
from lstmeng.masking import lengths_to_mask, pad_batch, pad_sequences
from lstmeng.sequential import Sequential
from lstmeng.serialization import load, save
from lstmeng.training import History, evaluate, fit

__version__ = "0.1.0"

__all__ = [
    "LSTM",
    "LSTMCell",
    "Bidirectional",
    "Dropout",
    "Dense",
    "Embedding",
    "Sequential",
    "losses",
    "fit",
    "evaluate",
    "History",
    "BackendInfo",
    "pad_sequences",
    "pad_batch",
    "lengths_to_mask",
    "save",
    "load",
    "from_keras",
    "from_torch",
    "list_backends",
    "set_backend",
    "get_backend",
    "use_backend",
    "optim",
    "__version__",
]
