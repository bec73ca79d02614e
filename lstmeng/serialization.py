"""Save and load layers and models as ``.npz``: a JSON config plus plain arrays.

Nothing is ever unpickled: files are opened with ``allow_pickle=False`` and the
config is JSON, so a hostile file can fail to load but cannot run code. ``load``
checks every array's shape against the shapes the config and the header's
``input_size`` imply before any weight goes in: a file that disagrees with
itself is refused, naming the entry, the expected and the actual shape.

File layout::

    __lstmeng__   the JSON document {"format": "lstmeng", "version": 1,
                  "class_name": ..., "config": ..., "input_size": ..., "weights": N,
                  "optimizer": {"config": ..., "state_keys": [k_0, ...]}  (only when saved with one)}
    weight_0 .. weight_{N-1}   the arrays of get_weights(), in order (host copies,
                  from either device)
    optimizer_state_0 ..       the arrays of the optimizer's ``state_dict()["state"]``,
                  in the order of state_keys

An optimizer (``lstmeng.optim``) is saved through its ``state_dict()``:
``{"config": <JSON-able dict>, "state": {str: host ndarray}}``, and restored
with ``load_state_dict`` of the same dict.
"""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np

from lstmeng import initializers
from lstmeng.bidirectional import Bidirectional
from lstmeng.cell import LSTMCell
from lstmeng.dense import Dense, Embedding
from lstmeng.dropout import Dropout
from lstmeng.layers import LSTM  # noqa: F401  (lstmeng.serialization.LSTM, as before)
from lstmeng.sequential import LAYER_CLASSES, Sequential

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


def save(obj, path, optimizer=None) -> None:
    """Write ``obj`` (LSTM, LSTMCell, Bidirectional, Sequential) to ``path`` (.npz).

    The weights are saved as host copies wherever ``obj`` lives. With
    ``optimizer`` (anything with ``state_dict()``, e.g. ``le.optim.Adam``)
    its configuration and state go into the same file.

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
    if optimizer is not None:
        optimizer_document, optimizer_arrays = _optimizer_entries(optimizer)
        document["optimizer"] = optimizer_document
        arrays.update(optimizer_arrays)
    with open(os.fspath(path), "wb") as handle:
        np.savez(handle, __lstmeng__=np.array(json.dumps(document)), **arrays)


def _optimizer_entries(optimizer):
    """The JSON entry and the arrays of ``optimizer.state_dict()``; errors before anything is written."""
    if not hasattr(optimizer, "state_dict"):
        raise TypeError(f"optimizer must have a state_dict() method (an lstmeng.optim optimizer), "
                        f"got {type(optimizer).__name__}")
    state_dict = optimizer.state_dict()
    if not isinstance(state_dict, dict) or set(state_dict) != {"config", "state"}:
        raise ValueError("optimizer.state_dict() must return {'config': dict, 'state': {str: array}}, got "
                         + (f"keys {sorted(state_dict)}" if isinstance(state_dict, dict)
                            else type(state_dict).__name__))
    try:
        json.dumps(state_dict["config"])
    except TypeError as error:
        raise ValueError(f"optimizer.state_dict()['config'] must be JSON-serialisable: {error}") from None
    keys = list(state_dict["state"])
    if not all(isinstance(key, str) for key in keys):
        raise ValueError("optimizer.state_dict()['state'] must have string keys")
    from lstmeng._arrays import host_copy  # device state (optimizer on the GPU) comes to the host here
    arrays = {f"optimizer_state_{i}": host_copy(state_dict["state"][key]) for i, key in enumerate(keys)}
    return {"config": state_dict["config"], "state_keys": keys}, arrays


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


def load(path, device=None, optimizer=None):
    """Read a file written by ``save`` and return the layer or model it holds.

    Args:
        path: the .npz file.
        device: None (where the saved config puts it: the GPU for
            backend="numba_cuda", else the CPU), "cpu", "cuda" or "cuda:N".
        optimizer: an optimizer whose ``load_state_dict`` receives the state
            saved with the model (ValueError if the file holds none). Build it
            over the loaded model first when resuming training, e.g.
            ``model = le.load(p, device="cuda"); opt = le.optim.Adam(model);
            le.serialization.load_optimizer_state(p, opt)``.

    Example:
        >>> import os, tempfile, lstmeng as le
        >>> path = os.path.join(tempfile.mkdtemp(), "lstm.npz")
        >>> le.save(le.LSTM(3, seed=0).build(2), path)
        >>> le.load(path, device="cpu").device
        'cpu'
    """
    path = os.fspath(path)
    if device is not None:
        from lstmeng._devices import parse_device
        parse_device(device)   # a bad or unavailable device is named before the file is read
    if not os.path.exists(path):
        raise FileNotFoundError(f"no lstmeng file at {path!r}")
    kind = _file_kind(path)
    if kind != "a zip archive":
        # Said from the file's first bytes: NumPy's own message would suggest allow_pickle, which
        # lstmeng never uses (unpickling runs code from the file).
        raise ValueError(f"{path!r} is not an lstmeng file: le.save writes .npz (zip) archives, and this is {kind}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:
        reason = "it holds Python objects, which lstmeng never loads" if "pickle" in str(error) else str(error)
        raise ValueError(f"{path!r} is not an lstmeng .npz file ({reason})") from None
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
            optimizer_state = _read_optimizer_state(archive, document) if optimizer is not None else None
        except (KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError, json.JSONDecodeError) as error:
            raise ValueError(f"{path!r} is not a valid lstmeng file: {error}") from None
    try:
        config = document.get("config")
        if not isinstance(config, dict):
            raise TypeError(f"config must be a JSON object, got {type(config).__name__}")
        obj = CLASSES[class_name].from_config(config)
    except KeyError as error:
        raise ValueError(f"{path!r} is an lstmeng file whose {class_name} config lacks the key {error}") from None
    # AttributeError: a nested config entry of the wrong JSON type (e.g. a string where a dict belongs).
    except (TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"{path!r} is an lstmeng file whose {class_name} config is invalid: {error}") from None
    # Every array against the shape the config implies, before any goes in: set_weights of an
    # unbuilt layer would otherwise build it from the arrays' shapes, whatever the config says.
    problem = _weights_disagree(obj, document.get("input_size"), weights)
    if problem:
        raise ValueError(f"{path!r} is an lstmeng file whose weights disagree with its {class_name} config: "
                         f"{problem}")
    try:
        if device is not None:
            obj.to(device)   # before the weights go in: they are copied once, straight to the device
        if weights:
            obj.set_weights(weights)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path!r} is an lstmeng file whose {class_name} weights are invalid: {error}") from None
    if optimizer is not None:
        optimizer.load_state_dict(optimizer_state)
    return obj


def _expected_weights(obj, input_size) -> list[tuple[str, tuple, str]]:
    """``(name, shape, why)`` of each array of ``obj.get_weights()``, in order, as its config implies.

    ``name`` is the weight's key in ``obj.params`` ("kernel", "1.forward.bias"); ``why`` says
    where the shape comes from. ``input_size`` is the header's (the features of the first layer
    that has them); a dimension it leaves unknown is None.
    """
    if isinstance(obj, Sequential):
        expected, size, first = [], None, True
        for index, layer in enumerate(obj.layers):
            if isinstance(layer, Dropout):
                continue
            if isinstance(layer, Embedding):
                expected.append((f"{index}.embeddings", (layer.input_dim, layer.output_dim),
                                 f"input_dim={layer.input_dim}, output_dim={layer.output_dim}"))
            else:
                if first:
                    # The header's input_size is the first such layer's (after an Embedding: its output_dim).
                    if size is not None and input_size is not None and input_size != size:
                        raise _Disagreement(f"the header's input_size is {input_size} but layers[{index}] "
                                            f"follows an Embedding of output_dim {size}")
                    size, first = input_size, False
                expected.extend((f"{index}.{name}", shape, why)
                                for name, shape, why in _expected_weights(layer, size))
            size = layer.units
        return expected
    if isinstance(obj, Bidirectional):
        return [(f"{prefix}.{name}", shape, why)
                for prefix, direction in (("forward", obj.forward_layer), ("backward", obj.backward_layer))
                for name, shape, why in _expected_weights(direction, input_size)]
    if isinstance(obj, Dense):
        expected = [("kernel", (input_size, obj.units), f"input_size={input_size}, units={obj.units}")]
        if obj.use_bias:
            expected.append(("bias", (obj.units,), f"units={obj.units}"))
        return expected
    # LSTM, LSTMCell: Keras's layout.
    units = obj.units
    expected = [("kernel", (input_size, 4 * units), f"input_size={input_size}, units={units}"),
                ("recurrent_kernel", (units, 4 * units), f"units={units}")]
    if obj.use_bias:
        expected.append(("bias", (4 * units,), f"units={units}"))
    return expected


class _Disagreement(Exception):
    """A header whose parts contradict each other (the message says how)."""


def _weights_disagree(obj, input_size, weights) -> str | None:
    """Why ``weights`` (the file's arrays) cannot be ``obj``'s for the header's ``input_size``; None if they can."""
    if input_size is not None and (isinstance(input_size, bool) or not isinstance(input_size, int)
                                   or input_size < 1):
        return f"the header's input_size must be a positive integer or null, got {input_size!r}"
    try:
        expected = _expected_weights(obj, input_size)
    except _Disagreement as error:
        return str(error)
    if not weights:
        if input_size is None or not expected:
            return None   # an unbuilt layer: its weights are made at its first call
        return (f"the header's input_size is {input_size}, so the file must hold {len(expected)} weights "
                f"({', '.join(name for name, _, _ in expected)}), but it holds none")
    if len(weights) != len(expected):
        return (f"the config implies {len(expected)} weights ({', '.join(name for name, _, _ in expected)}), "
                f"the file holds {len(weights)}")
    for index, ((name, shape, why), array) in enumerate(zip(expected, weights)):
        if None in shape:
            return (f"the header's input_size is null (an unbuilt layer) but the file holds weights "
                    f"(weight_{index}, {name}, has shape {tuple(array.shape)})")
        if tuple(array.shape) != shape:
            return f"weight_{index} ({name}) must have shape {shape} ({why}), got {tuple(array.shape)}"
    return None


#: First bytes of the files people mistake for lstmeng files -> what to call them.
_MAGIC = ((b"PK\x03\x04", "a zip archive"), (b"PK\x05\x06", "a zip archive"), (b"\x93NUMPY", "a bare NumPy .npy array"),
          (b"\x89HDF", "an HDF5 file (a Keras .h5/.keras model? convert it with le.from_keras)"))


def _file_kind(path) -> str:
    """What the file at ``path`` is, from its first bytes: "a zip archive" for an .npz, else a description."""
    if os.path.isdir(path):
        return "a directory"
    with open(path, "rb") as handle:
        head = handle.read(8)
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if not head:
        return "an empty file"
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:
        return "a Python pickle (e.g. a torch.save or pickle.dump file; lstmeng never unpickles)"
    return "not a zip archive"


def load_optimizer_state(path, optimizer) -> None:
    """Load the optimizer state saved by ``save(..., optimizer=...)`` into ``optimizer``."""
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            document = json.loads(str(archive["__lstmeng__"]))
            state = _read_optimizer_state(archive, document)
    except (KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError, json.JSONDecodeError) as error:
        raise ValueError(f"{path!r} holds no valid lstmeng optimizer state: {error}") from None
    optimizer.load_state_dict(state)


def _read_optimizer_state(archive, document) -> dict:
    """``{"config": ..., "state": {key: host array}}`` as ``state_dict()`` returned it when saved."""
    entry = document.get("optimizer")
    if entry is None:
        raise ValueError("it was saved without an optimizer (save(obj, path, optimizer=...))")
    keys = entry.get("state_keys") if isinstance(entry, dict) else None
    if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
        raise ValueError("its optimizer entry has no list of state keys")
    return {"config": entry.get("config"),
            "state": {key: archive[f"optimizer_state_{i}"] for i, key in enumerate(keys)}}
