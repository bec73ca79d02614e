"""What LSTM and LSTMCell share: options, weights, dropout masks, backend and device choice.

Weights are in Keras's layout and gate order (input, forget, cell
candidate, output)::

    kernel:           [I, 4H]
    recurrent_kernel: [H, 4H]
    bias:             [4H]     (absent when use_bias=False)

They live where the compute runs (PyTorch's and Keras's convention): host
NumPy arrays on "cpu", Numba device arrays on "cuda:N". ``to(device)`` moves
params, grads and carried states; ``get_weights`` always returns host copies
and ``set_weights`` copies in. A layer on the GPU copies a host input in and
its results out (NumPy in, NumPy out); a CUDA array given to a layer on the
CPU is an error that names both devices, as PyTorch's is.
"""

from __future__ import annotations

import os
import warnings
import zlib
from collections.abc import Mapping, MutableMapping

import numpy as np

from lstmeng import _validation, activations, initializers
from lstmeng.backends import registry
from lstmeng.backends.base import numpy_dtype

WEIGHT_NAMES = ("kernel", "recurrent_kernel", "bias")


def params_property():
    """The ``params`` property of a layer with ``_params`` storage: a live ``LayerArrays``."""
    return property(lambda self: LayerArrays(self, "params"),
                    lambda self, mapping: LayerArrays(self, "params").assign_all(mapping),
                    doc="name -> weight array, live: writes are checked and copied into the layer's arrays.")


def grads_property():
    """The ``grads`` property of a layer with ``_grads`` storage: a live ``LayerArrays``."""
    return property(lambda self: LayerArrays(self, "grads"),
                    lambda self, mapping: LayerArrays(self, "grads").assign_all(mapping),
                    doc="name -> gradient of the last backward round (see TrainingTape), live and checked.")


class LSTMWeights:
    """Options and weights of one LSTM direction; the base of LSTM and LSTMCell."""

    def __init__(self, units, *, activation="tanh", recurrent_activation="sigmoid",
                 use_bias=True, kernel_initializer="glorot_uniform",
                 recurrent_initializer="orthogonal", bias_initializer="zeros",
                 unit_forget_bias=True, dropout=0.0, recurrent_dropout=0.0,
                 dtype="float32", backend="auto", seed=None):
        self.units = _validation.check_units(units)
        self.activation = activations.check_activation(activation, "activation")
        self.recurrent_activation = activations.check_activation(recurrent_activation, "recurrent_activation")
        self.use_bias = bool(use_bias)
        self.kernel_initializer = initializers.check_initializer(kernel_initializer, "kernel_initializer")
        self.recurrent_initializer = initializers.check_initializer(recurrent_initializer, "recurrent_initializer")
        self.bias_initializer = initializers.check_initializer(bias_initializer, "bias_initializer")
        self.unit_forget_bias = bool(unit_forget_bias)
        self.dropout = _validation.check_rate(dropout, "dropout")
        self.recurrent_dropout = _validation.check_rate(recurrent_dropout, "recurrent_dropout")
        self.dtype = _validation.check_dtype(dtype)
        self.backend = registry.check_backend_choice(backend)   # unknown or unavailable: ValueError now
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise ValueError(f"seed must be an integer or None, got {seed!r}")
        self.seed = None if seed is None else int(seed)
        self._rng = np.random.default_rng(self.seed)
        self._params: dict = {}
        self._grads: dict = {}
        self._tapes = TrainingTape()
        self.input_size: int | None = None
        # Where params, grads and states live: "cpu" or "cuda:N". A layer that names
        # numba_cuda starts on the GPU; an "auto" layer moves there at its first call
        # if that call brings a CUDA array (``_device_chosen`` False until then).
        self._device = current_cuda_device() if backend == "numba_cuda" else "cpu"
        self._device_chosen = backend != "auto"

    # -- weights ---------------------------------------------------------------
    params = params_property()
    grads = grads_property()

    def zero_grads(self):
        """Set every gradient to zero (allocating zeros where no backward ran yet); returns self."""
        zero_grads_of(self)
        return self

    def reset_tape(self):
        """Drop every training call not yet backpropagated (their workspaces are freed); returns self."""
        self._tapes.clear()
        return self

    @property
    def built(self) -> bool:
        return self.input_size is not None

    def weight_shapes(self, input_size: int) -> dict[str, tuple]:
        shapes = {"kernel": (input_size, 4 * self.units), "recurrent_kernel": (self.units, 4 * self.units)}
        if self.use_bias:
            shapes["bias"] = (4 * self.units,)
        return shapes

    def build(self, input_size):
        """Create the weights for ``input_size`` features (done on first call otherwise)."""
        input_size = _validation.check_units(input_size, "input_size")
        shapes = self.weight_shapes(input_size)
        params = {
            "kernel": initializers.initialize(self.kernel_initializer, shapes["kernel"], self._rng,
                                              self.dtype, "kernel_initializer"),
            "recurrent_kernel": initializers.initialize(self.recurrent_initializer, shapes["recurrent_kernel"],
                                                        self._rng, self.dtype, "recurrent_initializer"),
        }
        if self.use_bias:
            bias = initializers.initialize(self.bias_initializer, shapes["bias"], self._rng,
                                           self.dtype, "bias_initializer")
            if self.unit_forget_bias:
                # Keras: bias = [init(H), ones(H), init(2H)] so the forget gate starts open.
                bias[self.units:2 * self.units] = 1.0
            params["bias"] = bias
        self._params = {name: self._on_device(value) for name, value in params.items()}
        self.input_size = input_size
        return self

    def get_weights(self) -> list[np.ndarray]:
        """[kernel (I, 4H), recurrent_kernel (H, 4H), bias (4H,)] as host NumPy copies (no bias if
        use_bias=False), wherever the layer lives."""
        if not self.built:
            return []
        return [host_copy(self._params[name]) for name in WEIGHT_NAMES if name in self._params]

    def set_weights(self, weights):
        """Load Keras-layout weights; builds the layer from their shapes if needed.

        Nothing changes unless every array has the right shape.
        """
        weights = list(weights)
        names = [name for name in WEIGHT_NAMES if name != "bias" or self.use_bias]
        if len(weights) != len(names):
            raise ValueError(f"set_weights expects {len(names)} arrays ({', '.join(names)}), got {len(weights)}")
        arrays = [host_copy(w) for w in weights]
        input_size = self.input_size if self.built else (arrays[0].shape[0] if arrays[0].ndim == 2 else 0)
        if input_size < 1:
            raise ValueError(f"set_weights: kernel must have shape (input_size >= 1, {4 * self.units}), "
                             f"got {arrays[0].shape}")
        shapes = self.weight_shapes(input_size)
        for name, array in zip(names, arrays):
            if array.shape != shapes[name]:
                transposed = array.ndim == 2 and array.shape[::-1] == shapes[name]
                hint = "" if not transposed else (
                    " (the transpose of it: PyTorch's layout, [4H, I] in gate order i, f, g, o; convert a "
                    "torch.nn.LSTM with le.from_torch, or pass weight.T)")
                raise ValueError(f"set_weights: {name} must have shape {shapes[name]} (Keras's layout), "
                                 f"got {array.shape}{hint}")
            if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
                raise TypeError(f"set_weights: {name} must be real numbers, got dtype {array.dtype}")
        host = {name: np.array(array, dtype=self.dtype, copy=True) for name, array in zip(names, arrays)}
        # Copied to the device before anything is assigned: a failed copy changes nothing.
        self._params = {name: self._on_device(array) for name, array in host.items()}
        self.input_size = input_size
        return self

    # -- device ----------------------------------------------------------------
    @property
    def device(self) -> str:
        """Where params, grads and states live: "cpu" or "cuda:N"."""
        return self._device

    def to(self, device):
        """Move params, grads and carried states to ``device`` ("cpu", "cuda", "cuda:N"); returns self.

        On "cuda" the layer computes with the numba_cuda backend and keeps its
        weights and gradients there: a training loop moves no weight over the bus.

        Example:
            >>> import lstmeng as le
            >>> le.LSTM(4).to("cpu").device
            'cpu'
        """
        target = parse_device(device)
        if target != "cpu" and self.backend not in ("auto", "numba_cuda"):
            raise ValueError(f"to({device!r}): this layer's backend is {self.backend!r}, which computes on the "
                             "CPU; build it with backend='auto' or 'numba_cuda' to run it on a GPU")
        move = _mover(target)
        # Everything is moved first and assigned last: a failed copy leaves the layer as it was.
        moved = {"params": {name: move(value) for name, value in self._params.items()},
                 "grads": {name: move(value) for name, value in self._grads.items()}}
        extra = self._moved_states(move)
        self._params, self._grads = moved["params"], moved["grads"]
        self._assign_moved_states(extra)
        self._device, self._device_chosen = target, True
        return self

    def _moved_states(self, move):
        """States other than params and grads, moved by ``move`` (subclasses add theirs)."""
        return None

    def _assign_moved_states(self, moved) -> None:
        pass

    def _on_device(self, array):
        """A host array placed on this layer's device (itself on the CPU)."""
        return array if self._device == "cpu" else _mover(self._device)(array)

    def _options_config(self) -> dict:
        return {
            "units": self.units,
            "activation": self.activation,
            "recurrent_activation": self.recurrent_activation,
            "use_bias": self.use_bias,
            "kernel_initializer": initializers.serialize(self.kernel_initializer),
            "recurrent_initializer": initializers.serialize(self.recurrent_initializer),
            "bias_initializer": initializers.serialize(self.bias_initializer),
            "unit_forget_bias": self.unit_forget_bias,
            "dropout": self.dropout,
            "recurrent_dropout": self.recurrent_dropout,
            "dtype": self.dtype.name,
            "backend": self.backend,
            "seed": self.seed,
        }

    # -- per call --------------------------------------------------------------
    def _resolve_backend(self, x, argument="x"):
        """The backend of a call with input ``x``; on the GPU always numba_cuda.

        An "auto" layer never called nor moved adopts the GPU when its first
        input is a CUDA array (its weights are copied there once). Otherwise a
        CUDA array given to a layer on the CPU is an error naming both devices.
        A call settles the device once it has run (``_device_chosen``), so a
        first call rejected by validation leaves the choice open.
        """
        kind = registry.array_kind(x)
        if self._device == "cpu" and kind == "cuda":
            if not self._device_chosen and registry.get_backend() in ("auto", "numba_cuda"):
                self.to("cuda")
            else:
                raise ValueError(
                    f"{argument}: expected an array on cpu, where this layer's parameters are, got an array "
                    f"on {current_cuda_device()}; call layer.to('cuda') first (or pass a NumPy array)")
        if self._device != "cpu":
            if kind == "tensorflow":
                raise ValueError(f"{argument}: this layer lives on {self._device} and takes CUDA or NumPy "
                                 "arrays, got a tf.Tensor; pass x.numpy() or call layer.to('cpu')")
            backend = registry.get_backend_object("numba_cuda")
            try:
                backend.check_support(self.dtype, self.activation, self.recurrent_activation)
            except NotImplementedError as error:
                raise ValueError(f"backend 'numba_cuda' cannot run this layer: {error}") from None
            return backend
        return registry.resolve(self.backend, x, self.dtype, self.activation, self.recurrent_activation)

    def _to_call_device(self, backend, array):
        """A host array made the backend's kind when the layer lives on the GPU (copied in)."""
        if self._device != "cpu" and array is not None and registry.array_kind(array) == "host":
            return backend.ops.asarray(array, self.dtype)
        return array

    def _check_input_size(self, input_size: int, argument: str = "x") -> None:
        """Raise if the layer is built for another number of features."""
        if self.built and input_size != self.input_size:
            raise ValueError(
                f"{argument} has {input_size} features but the layer was built for {self.input_size}")

    def _ensure_built(self, input_size: int, argument: str = "x"):
        self._check_input_size(input_size, argument)
        if not self.built:
            self.build(input_size)

    def _dropout_masks(self, batch: int, training: bool):
        """Inverted-dropout masks ``[B, I]`` and ``[B, H]`` (None when off), one per sequence."""
        input_mask = recurrent_mask = None
        if training and self.dropout > 0:
            keep = 1.0 - self.dropout
            input_mask = (self._rng.random((batch, self.input_size)) < keep).astype(self.dtype) / self.dtype.type(keep)
        if training and self.recurrent_dropout > 0:
            keep = 1.0 - self.recurrent_dropout
            recurrent_mask = (self._rng.random((batch, self.units)) < keep).astype(self.dtype) / self.dtype.type(keep)
        return input_mask, recurrent_mask

    def _weights_for(self, backend):
        return (backend.ops.asarray(self._params["kernel"], self.dtype),
                backend.ops.asarray(self._params["recurrent_kernel"], self.dtype),
                backend.ops.asarray(self._params["bias"], self.dtype) if self.use_bias else None)

    def _store_grads(self, backend, grads, accumulate=False) -> None:
        """Keep the weight gradients where the weights are: no copy on the GPU (a copy only if the
        layer was moved between its forward and its backward).

        ``accumulate``: add them to the current gradients (a later backward of one tape)
        instead of replacing them (the first backward of a tape).
        """
        keep = _mover(self._device) if self._device != "cpu" else backend.ops.to_numpy
        fresh = {"kernel": keep(grads.dkernel), "recurrent_kernel": keep(grads.drecurrent_kernel)}
        if self.use_bias:
            fresh["bias"] = keep(grads.dbias)
        self._set_grads(fresh, accumulate)

    def _set_grads(self, fresh: dict, accumulate: bool) -> None:
        """Replace the gradients with ``fresh``, or add ``fresh`` to them (on their device)."""
        if accumulate and self._grads:
            add = np.add if self._device == "cpu" else registry.get_backend_object("numba_cuda").ops.add
            fresh = {name: add(self._grads[name], value) for name, value in fresh.items()}
        self._grads = fresh

    def _input_guard(self, x, argument: str, host_io: bool):
        """An ``InputGuard`` of the input a training call's workspace references, under
        ``LSTMENG_DEBUG=1``; None otherwise, and when ``x`` is a device copy this layer made of
        a host input (the caller's array is not referenced then)."""
        if not debug_checks() or (self._device != "cpu" and host_io):
            return None
        return InputGuard.of(x, argument)

    def _zero_weight_grads(self, backend) -> dict:
        """Zero gradients for every weight, on the layer's device (a call with no step)."""
        shapes = self.weight_shapes(self.input_size)
        if self._device != "cpu":
            return {name: backend.ops.zeros(shape, self.dtype) for name, shape in shapes.items()}
        return {name: np.zeros(shape, self.dtype) for name, shape in shapes.items()}


# -- LSTMENG_DEBUG: inputs changed between a training forward and its backward ---------------------
DEBUG_ENV = "LSTMENG_DEBUG"


def debug_checks() -> bool:
    """True when ``LSTMENG_DEBUG`` is set to anything but "", "0", "false", "no" or "off".

    Read at every training call (one environment lookup), so it can be switched
    on for one part of a program, or in a test with ``monkeypatch.setenv``.
    """
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def _checksum(array):
    """(shape, dtype, CRC-32 of the contents) of a host or CUDA array; None for immutable kinds.

    One pass over the array (a device array is copied to the host first): the
    price of the debug switch, paid at the training forward and at its backward.
    """
    kind = registry.array_kind(array)
    if kind == "tensorflow":   # a tf.Tensor cannot change in place
        return None
    host = np.asarray(array) if kind == "host" else registry.backend_for_array(array).ops.to_numpy(array)
    host = np.ascontiguousarray(host)
    return tuple(int(n) for n in host.shape), host.dtype.str, zlib.crc32(host.reshape(-1).view(np.uint8))


class InputGuard:
    """Catches an input changed in place between a training forward and its backward.

    The workspace of a training call references the caller's ``x`` instead of
    copying it (as PyTorch's saved tensors do), so an in-place change before
    the backward silently gives wrong gradients. With ``LSTMENG_DEBUG=1`` the
    layer keeps a checksum of ``x`` on its tape and ``backward`` recomputes it
    and raises on a mismatch, as PyTorch's version counter does.
    """

    __slots__ = ("argument", "array", "checksum")

    def __init__(self, array, argument: str, checksum):
        self.array, self.argument, self.checksum = array, argument, checksum

    @classmethod
    def of(cls, array, argument: str):
        """The guard of ``array`` (named ``argument`` in errors); None when it cannot change in place."""
        checksum = _checksum(array)
        return None if checksum is None else cls(array, argument, checksum)

    def check(self) -> None:
        """RuntimeError if the array's contents (or shape) changed since the guard was made."""
        now = _checksum(self.array)
        if now == self.checksum:
            return
        what = (f"its shape changed from {self.checksum[0]} to {now[0]}" if now[0] != self.checksum[0]
                else "its values changed")
        name = self.argument
        raise RuntimeError(
            f"{name} was modified in place since the training forward call that this backward belongs to "
            f"({what}): the workspace references {name} instead of copying it, so the gradients would be wrong. "
            f"Leave {name} unchanged until its backward has run, or pass a copy ({name}.copy()) to the "
            f"training call; reset_tape() drops the call. (Checked because {DEBUG_ENV} is set.)")


# -- the training tape ---------------------------------------------------------------------------
class TrainingTape:
    """What training calls left for ``backward``, consumed last-in-first-out.

    Every layer keeps one. A ``training=True`` call pushes an entry; an
    inference call never touches the tape. ``backward`` pops the most recent
    entry, so calls made one after the other (a shared encoder applied to two
    inputs, tied weights, the steps of an ``LSTMCell`` unroll) are
    backpropagated in reverse order.

    The entries pushed since the tape was last empty form one *round*: the
    first backward of a round replaces the layer's gradients, later ones add
    to them, so after the round ``grads`` holds the gradient of everything
    the round computed. A training call made after a backward starts a new
    round: entries left unconsumed (a truncated unroll) are dropped, so a new
    sequence never inherits a half-used tape.
    """

    def __init__(self, warn_after: int = 256):
        self._entries: list = []
        self._backward_ran = False   # a backward consumed an entry of the current round
        # Training calls never backpropagated keep their workspaces alive (training=True used for
        # inference, e.g. Monte Carlo dropout): say so once, when a round grows this long.
        self._warn_after = warn_after
        self._warned = False

    def push(self, entry) -> bool:
        """Record a training call; returns True when it starts a new round."""
        if self._backward_ran:
            self._entries.clear()   # a new round over leftovers of a truncated one: start clean
            self._backward_ran = False
        new_round = not self._entries
        self._entries.append(entry)
        if len(self._entries) > self._warn_after and not self._warned:
            self._warned = True
            warnings.warn(f"{len(self._entries)} training calls are recorded and none was backpropagated: "
                          "their workspaces stay in memory until backward() or reset_tape(); call with "
                          "training=False where no backward follows", ResourceWarning, stacklevel=4)
        return new_round

    @property
    def next_backward_adds(self) -> bool:
        """True when the next backward adds to the gradients (a backward of this round already ran)."""
        return self._backward_ran

    @property
    def next_call_starts_round(self) -> bool:
        """True when the next training call starts a new round (the tape is empty or was backpropagated)."""
        return not self._entries or self._backward_ran

    def peek(self, what: str = "backward"):
        """The most recent unconsumed entry; RuntimeError when there is none."""
        if not self._entries:
            raise RuntimeError(f"{what} needs a forward call with training=True first (each training call is "
                               "backpropagated once, most recent first)")
        return self._entries[-1]

    def pop(self) -> tuple:
        """Consume the most recent entry; returns ``(entry, accumulate)`` where ``accumulate`` is
        False for the round's first backward (which replaces the gradients)."""
        entry = self.peek()
        accumulate = self._backward_ran
        self._entries.pop()
        self._backward_ran = True
        return entry, accumulate

    def undo_pop(self, entry, accumulate: bool) -> None:
        """Put back an entry popped by a backward that then failed elsewhere (nothing half-consumed)."""
        self._entries.append(entry)
        self._backward_ran = accumulate

    def drop_last(self) -> None:
        """Forget the entry just pushed (a call that failed after pushing it)."""
        if self._entries:
            self._entries.pop()

    @property
    def last(self):
        return self._entries[-1] if self._entries else None

    def clear(self) -> None:
        self._entries.clear()
        self._backward_ran = False

    def __len__(self) -> int:
        return len(self._entries)


# -- params and grads: live, checked mappings ------------------------------------------------------
class LayerArrays(MutableMapping):
    """A layer's ``params`` or ``grads``: a live view of its arrays whose writes are checked.

    Reading gives the layer's own arrays (updating one in place updates the
    layer). ``mapping[name] = value`` copies ``value`` into the layer's array
    after checking that it matches the parameter ``name`` in shape, dtype and
    device; nothing is written when a check fails. Assigning the whole
    mapping (``layer.grads = {...}``) checks every entry before writing any.
    A gradient that no backward has made yet is stored (as given).

    Example:
        >>> import numpy as np, lstmeng as le
        >>> lstm = le.LSTM(2, seed=0).build(3)
        >>> lstm.params["bias"] = np.full(8, 0.5, np.float32)
        >>> float(lstm.get_weights()[2][0])
        0.5
    """

    def __init__(self, layer, kind: str):
        self._layer, self._kind = layer, kind

    def _storage(self) -> dict:
        return getattr(self._layer, "_" + self._kind)

    def __getitem__(self, name):
        return self._storage()[name]

    def __iter__(self):
        return iter(list(self._storage()))

    def __len__(self) -> int:
        return len(self._storage())

    def __contains__(self, name) -> bool:
        return name in self._storage()

    def __delitem__(self, name):
        raise TypeError(f"{self._kind}: entries cannot be deleted (zero them with zero_grads(), or rebuild the layer)")

    def __setitem__(self, name, value):
        self.check(name, value)
        self.write(name, value)

    def check(self, name, value, shown=None) -> None:
        """Raise unless ``value`` can be written as ``name`` (shape, dtype, device of the parameter).

        ``shown`` is the key the user wrote (a model's ``"1.forward.kernel"``), named in errors.
        """
        params = self._layer._params
        shown = name if shown is None else shown
        if name not in params:
            known = sorted(params) if params else "none: the layer is not built yet (call build() or the layer once)"
            raise KeyError(f"{self._kind}: no parameter {shown!r}; the parameters are {known}")
        check_like(params[name], value, f"{self._kind}[{shown!r}]")

    def write(self, name, value) -> None:
        storage = self._storage()
        if name in storage:
            copy_into(storage[name], value)
        else:
            storage[name] = value

    def assign_all(self, mapping) -> None:
        """``layer.<kind> = mapping``: every entry checked first, then all written."""
        checked = _checked_mapping(mapping, self._kind)
        for name, value in checked.items():
            self.check(name, value)
        for name, value in checked.items():
            self.write(name, value)

    def __repr__(self) -> str:
        return f"{self._kind}({ {name: _describe(value) for name, value in self._storage().items()} })"


class PrefixedArrays(MutableMapping):
    """A model's ``params`` or ``grads``: its sublayers' live mappings under ``"<prefix>.<name>"``.

    Writes go to the sublayer's mapping, so they are checked and reach its
    arrays as on a single layer.
    """

    def __init__(self, children, kind: str):
        self._children, self._kind = children, kind   # () -> [(prefix, layer)]

    def _route(self, key):
        if isinstance(key, str) and "." in key:
            prefix, rest = key.split(".", 1)
            for child_prefix, child in self._children():
                if child_prefix == prefix:
                    return getattr(child, self._kind), rest
        known = sorted(PrefixedArrays(self._children, "params"))
        raise KeyError(f"{self._kind}: no parameter {key!r}; the parameters are {known}")

    def __getitem__(self, key):
        mapping, rest = self._route(key)
        return mapping[rest]

    def __iter__(self):
        keys = []
        for prefix, child in self._children():
            keys.extend(f"{prefix}.{name}" for name in getattr(child, self._kind))
        return iter(keys)

    def __len__(self) -> int:
        return sum(len(getattr(child, self._kind)) for _, child in self._children())

    def __contains__(self, key) -> bool:
        try:
            mapping, rest = self._route(key)
        except KeyError:
            return False
        return rest in mapping

    def __delitem__(self, key):
        raise TypeError(f"{self._kind}: entries cannot be deleted")

    def __setitem__(self, key, value):
        self.check(key, value)
        self.write(key, value)

    def check(self, key, value, shown=None) -> None:
        mapping, rest = self._route(key)
        mapping.check(rest, value, key if shown is None else shown)

    def write(self, key, value) -> None:
        mapping, rest = self._route(key)
        mapping.write(rest, value)

    def assign_all(self, mapping) -> None:
        checked = _checked_mapping(mapping, self._kind)
        for key, value in checked.items():
            self.check(key, value)
        for key, value in checked.items():
            self.write(key, value)

    def __repr__(self) -> str:
        return f"{self._kind}({ {key: _describe(self[key]) for key in self} })"


def _checked_mapping(mapping, kind: str) -> dict:
    if not isinstance(mapping, Mapping):
        raise TypeError(f"{kind} must be assigned a mapping of name -> array, got {type(mapping).__name__}")
    return dict(mapping)


def _describe(array) -> str:
    return f"{array_dtype_name(array)}{tuple(int(n) for n in array.shape)} on {_device_of(array)}"


def _device_of(array) -> str:
    kind = registry.array_kind(array)
    return {"cuda": "cuda", "tensorflow": "tensorflow"}.get(kind, "cpu")


def check_like(reference, value, what: str) -> None:
    """Raise unless ``value`` has the shape, dtype and device of ``reference`` (error names all three)."""
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        if registry.array_kind(value) != "host":
            raise TypeError(f"{what}: expected an array, got {type(value).__name__}")
        value = np.asarray(value)
    expected_device, actual_device = _device_of(reference), _device_of(value)
    if expected_device != actual_device:
        raise ValueError(f"{what}: expected an array on {expected_device}, where the parameter is, got one on "
                         f"{actual_device}")
    expected_shape, actual_shape = tuple(int(n) for n in reference.shape), tuple(int(n) for n in value.shape)
    if expected_shape != actual_shape:
        raise ValueError(f"{what}: expected shape {expected_shape}, got {actual_shape}")
    expected_dtype, actual_dtype = array_dtype_name(reference), array_dtype_name(value, what)
    if expected_dtype != actual_dtype:
        raise TypeError(f"{what}: expected dtype {expected_dtype}, got {actual_dtype} (cast it with "
                        f".astype('{expected_dtype}'))")


def copy_into(target, value) -> None:
    """Copy ``value`` into ``target`` in place (both checked alike by ``check_like``)."""
    if registry.array_kind(target) == "host":
        np.copyto(target, np.asarray(value))
    else:
        backend = registry.get_backend_object("numba_cuda")
        target.copy_to_device(backend.ops.asarray(value, np.dtype(array_dtype_name(value))))


def zero_grads_of(layer) -> None:
    """Zero a leaf layer's gradients in place, creating zero arrays for parameters without one."""
    grads = layer._grads
    for name, param in layer._params.items():
        if name not in grads:
            grads[name] = (np.zeros_like(param) if registry.array_kind(param) == "host"
                           else registry.get_backend_object("numba_cuda").ops.zeros_like(param))
        elif registry.array_kind(grads[name]) == "host":
            grads[name][...] = 0
        else:
            from lstmeng.backends import _cuda_optim   # the optimizer's in-place fill: no allocation
            _cuda_optim.fill_zero(grads[name])


def array_dtype_name(array, argument="x") -> str:
    """NumPy's name of a backend array's dtype ("float32"), whatever library made it.

    CUDA arrays are read through ``__cuda_array_interface__['typestr']`` ("<f4"),
    the one field torch, CuPy and Numba agree on (torch's own dtype prints as
    "torch.float32").
    """
    dtype = getattr(array, "dtype", None)
    if isinstance(dtype, np.dtype):   # Numba and CuPy arrays: no interface dict to build
        return dtype.name
    if registry.array_kind(array) == "cuda":
        try:
            return numpy_dtype(array).name
        except RuntimeError as error:  # torch: a tensor that requires grad exports no interface
            raise TypeError(f"{argument}: cannot read this CUDA array without a copy ({error}); "
                            f"pass {argument}.detach()") from None
    return getattr(dtype, "name", str(dtype))


def prepare_input(backend, x, dtype, argument="x"):
    """Host input: checked and cast to ``dtype``; a backend's own arrays: dtype checked."""
    if registry.array_kind(x) == "host":
        return _validation.check_numeric_array(x, argument, dtype)
    name = array_dtype_name(x, argument)
    if name != dtype.name:
        raise TypeError(f"{argument} must have dtype {dtype.name} on this layer, got {name}")
    return backend.ops.asarray(x, dtype)


def host_copy(array) -> np.ndarray:
    """A host NumPy copy of a host, CUDA or TensorFlow array."""
    if registry.array_kind(array) == "host":
        return np.array(array, copy=True)
    return np.array(registry.backend_for_array(array).ops.to_numpy(array), copy=True)


def current_cuda_device() -> str:
    """"cuda:N" for numba's current CUDA device (0 under the simulator)."""
    backend = registry.get_backend_object("numba_cuda")
    return f"cuda:{backend.device_index()}"


def parse_device(device) -> str:
    """"cpu", "cuda" or "cuda:N" (or a torch.device) -> "cpu" or "cuda:N"; ValueError otherwise.

    "cuda:N" must be numba's current device: lstmeng launches on the current
    CUDA context, so another GPU is selected with numba.cuda.select_device(N)
    (or ``with numba.cuda.gpus[N]:``) before the layer is moved and called.
    """
    text = str(device).strip().lower()
    if text == "cpu":
        return "cpu"
    if text != "cuda" and not (text.startswith("cuda:") and text[5:].isdigit()):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    current = current_cuda_device()   # ValueError naming why when numba_cuda is unavailable
    if text != "cuda" and text != current:
        raise ValueError(f"device {text!r} is not numba's current CUDA device ({current}); select it first "
                         f"with numba.cuda.select_device({text[5:]}) or `with numba.cuda.gpus[{text[5:]}]:`")
    return current


def _mover(target: str):
    """A function that returns its array on ``target`` ("cpu" or "cuda:N"), copying only when needed."""
    if target == "cpu":
        return lambda array: array if registry.array_kind(array) == "host" else host_copy(array)
    backend = registry.get_backend_object("numba_cuda")

    def to_cuda(array):
        dtype = np.dtype(array_dtype_name(array)) if registry.array_kind(array) == "cuda" else array.dtype
        return backend.ops.asarray(array, dtype)
    return to_cuda


def prepare_state(backend, state, dtype, argument, shape):
    """Check one initial state ``[B, H]`` and convert it to the backend's kind."""
    if state is None:
        raise ValueError(f"{argument} must be an array of shape {shape}, got None")
    if registry.array_kind(state) == "host":
        state = _validation.check_numeric_array(state, argument, dtype)
    _validation.check_shape(state, argument, shape)
    return backend.ops.asarray(state, dtype)
