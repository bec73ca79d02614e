"""Arrays of layers: live, checked ``params`` / ``grads`` mappings and the input and state checks.

``params`` and ``grads`` of every layer and model are live mappings: reading
gives the layer's own arrays, a write is checked (shape, dtype, device) and
copied into them, so optimizers update in place. ``prepare_input`` /
``prepare_state`` check a call's arrays and convert them to a backend's kind;
``host_copy`` brings any array (host, CUDA, TensorFlow) to a host copy.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

import numpy as np

from lstmeng import _validation
from lstmeng.backends import registry
from lstmeng.backends.base import numpy_dtype


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
            from lstmeng.backends import _cuda_optim  # the optimizer's in-place fill: no allocation
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


def prepare_state(backend, state, dtype, argument, shape):
    """Check one initial state ``[B, H]`` and convert it to the backend's kind."""
    if state is None:
        raise ValueError(f"{argument} must be an array of shape {shape}, got None")
    if registry.array_kind(state) == "host":
        state = _validation.check_numeric_array(state, argument, dtype)
    _validation.check_shape(state, argument, shape)
    return backend.ops.asarray(state, dtype)


def host_copy(array) -> np.ndarray:
    """A host NumPy copy of a host, CUDA or TensorFlow array."""
    if registry.array_kind(array) == "host":
        return np.array(array, copy=True)
    return np.array(registry.backend_for_array(array).ops.to_numpy(array), copy=True)
