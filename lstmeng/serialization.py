"""Save and load layers and models as ``.npz``: a JSON config plus plain arrays.

Nothing is ever unpickled: files are opened with ``allow_pickle=False`` and the
config is JSON, so a hostile file can fail to load but cannot run code.

File layout::

    __lstmeng__   the JSON document {"format": "lstmeng", "version": 1,
                  "class_name": ..., "config": ..., "input_size": ..., "weights": N}
    weight_0 .. weight_{N-1}   the arrays of get_weights(), in order
"""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np

from lstmeng import initializers
from lstmeng.layers import LSTM
from lstmeng.cell import LSTMCell
from lstmeng.wrappers import LAYER_CLASSES, Sequential

FORMAT = "lstmeng"
VERSION = 1
CLASSES = dict(LAYER_CLASSES, Sequential=Sequential, LSTMCell=LSTMCell)


def _input_size(obj):
    if isinstance(obj, Sequential):
        for layer in obj.layers:
            if hasattr(layer, "input_size"):
                return layer.input_size
        return None
    return getattr(obj, "input_size", None)


def save(obj, path) -> None:
    """Write ``obj`` (LSTM, LSTMCell, Bidirectional, Sequential) to ``path`` (.npz).

    Example:
        >>> import os, tempfile, numpy as np, lstmeng as le
        >>> lstm = le.LSTM(3, seed=0).build(2)
        >>> path = os.path.join(tempfile.mkdtemp(), "lstm.npz")
        >>> le.save(lstm, path)
        >>> np.allclose(le.load(path).get_weights()[0], lstm.get_weights()[0])
        True
    """
    name = type(obj).__name__
    if name not in CLASSES or not isinstance(obj, CLASSES[name]):
        raise TypeError(f"save expects one of {sorted(CLASSES)}, got {type(obj).__name__}")
    weights = obj.get_weights()
    config = _without_custom_initializers(obj.get_config(), built=_input_size(obj) is not None)
    document = {"format": FORMAT, "version": VERSION, "class_name": name, "config": config,
                "input_size": _input_size(obj), "weights": len(weights)}
    arrays = {f"weight_{i}": np.asarray(w) for i, w in enumerate(weights)}
    with open(os.fspath(path), "wb") as handle:
        np.savez(handle, __lstmeng__=np.array(json.dumps(document)), **arrays)


def _without_custom_initializers(config, built: bool):
    """``config`` with callable initializers (saved by name, not loadable) replaced by the defaults.

    A built layer's file holds its weights, so its initializers are never used
    again; an unbuilt layer with a callable initializer cannot be saved.
    """
    if isinstance(config, list):
        return [_without_custom_initializers(entry, built) for entry in config]
    if not isinstance(config, dict):
        return config
    cleaned = {}
    for key, value in config.items():
        if key in _DEFAULT_INITIALIZERS and value not in initializers.INITIALIZERS:
            if not built:
                raise ValueError(f"cannot save an unbuilt layer whose {key} is a callable ({value!r}): "
                                 "build it first, so that the file holds its weights")
            value = _DEFAULT_INITIALIZERS[key]
        cleaned[key] = _without_custom_initializers(value, built)
    return cleaned


_DEFAULT_INITIALIZERS = {"kernel_initializer": "glorot_uniform", "recurrent_initializer": "orthogonal",
                         "bias_initializer": "zeros"}


def load(path):
    """Read a file written by ``save`` and return the layer or model it holds."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no lstmeng file at {path!r}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:
        raise ValueError(f"{path!r} is not an lstmeng .npz file ({error})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path!r} is not an lstmeng .npz file (a bare .npy array)")
    with archive:
        try:
            if "__lstmeng__" not in archive.files:
                raise ValueError("it has no __lstmeng__ entry")
            raw = archive["__lstmeng__"]
            if raw.dtype.kind != "U" or raw.shape != ():
                raise ValueError("its __lstmeng__ entry is not a JSON string")
            document = json.loads(str(raw))
            if not isinstance(document, dict) or document.get("format") != FORMAT:
                raise ValueError("its header is not an lstmeng header")
            if document.get("version") != VERSION:
                raise ValueError(f"format version {document.get('version')!r} is not {VERSION}")
            class_name = document.get("class_name")
            if class_name not in CLASSES:
                raise ValueError(f"unknown class {class_name!r}")
            count = document.get("weights")
            if not isinstance(count, int) or count < 0:
                raise ValueError(f"bad weight count {count!r}")
            weights = [archive[f"weight_{i}"] for i in range(count)]
        except (KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError, json.JSONDecodeError) as error:
            raise ValueError(f"{path!r} is not a valid lstmeng file: {error}") from None
    try:
        config = document.get("config")
        if not isinstance(config, dict):
            raise TypeError(f"config must be a JSON object, got {type(config).__name__}")
        obj = CLASSES[class_name].from_config(config)
        if weights:
            obj.set_weights(weights)
    except KeyError as error:
        raise ValueError(f"{path!r} is an lstmeng file whose {class_name} config lacks the key {error}") from None
    # AttributeError: a nested config entry of the wrong JSON type (e.g. a string where a dict belongs).
    except (TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"{path!r} is an lstmeng file whose {class_name} config or weights are invalid: "
                         f"{error}") from None
    return obj
