"""LSTMBase, what LSTM and LSTMCell share: options, weights, dropout masks, backend and device choice.

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

import numpy as np

from lstmeng import _validation, activations, initializers
from lstmeng._arrays import grads_property, host_copy, params_property, zero_grads_of
from lstmeng._devices import _mover, cuda_array_on_cpu_layer, current_cuda_device, parse_device
from lstmeng._tape import InputGuard, TrainingTape, debug_checks
from lstmeng.backends import registry

WEIGHT_NAMES = ("kernel", "recurrent_kernel", "bias")


class LSTMBase:
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
                raise cuda_array_on_cpu_layer(argument)
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
        """Replace the gradients with ``fresh``, or add ``fresh`` to them (on their device).

        On the host the sum goes into the current arrays, which by then are this round's
        own (a backward's results, or sums made here): a cell's unroll adds every step's
        gradients, and a fresh array per step cost a page-faulting allocation of the whole
        gradient (6 MB at I = 256, H = 512) on top of the add. ``grads`` is live, so a
        reference read during the round follows it, as on the GPU.
        """
        if accumulate and self._grads:
            if self._device == "cpu":
                for name, value in fresh.items():
                    current = self._grads.get(name)
                    if (isinstance(current, np.ndarray) and isinstance(value, np.ndarray)
                            and current.shape == value.shape and current.dtype == value.dtype
                            and current.flags.writeable):
                        np.add(current, value, out=current)
                        fresh[name] = current
                    else:
                        fresh[name] = np.add(current, value)
            else:
                add = registry.get_backend_object("numba_cuda").ops.add
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
