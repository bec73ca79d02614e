"""Optimizers and gradient clipping over any lstmeng layer's or model's ``params`` / ``grads``.

``SGD`` (momentum, Nesterov, weight decay), ``Adam`` (L2 weight decay added to
the gradient), ``AdamW`` (decoupled weight decay) and ``clip_grad_norm`` follow
``torch.optim`` / ``torch.nn.utils.clip_grad_norm_`` step for step (bias
correction, the order of the operations, the first momentum step), so a
model trained here and one trained with PyTorch on the same gradients see
the same weights up to rounding.

A "model" is any object with ``params`` and ``grads`` mappings of name ->
array (``le.LSTM``, ``le.LSTMCell``, ``le.Bidirectional``, ``le.Sequential``, or
your own), or a list of them. Both mappings are read again at every call,
because a layer's gradient arrays can be replaced by its backward and its
weights by ``set_weights``; the arrays are always updated in place, so the
layers (and a GPU layer's kernels) keep their own arrays and a step
allocates nothing.

Where the arrays live decides where the update runs: host NumPy arrays are
updated with vectorised NumPy; CUDA arrays (anything with
``__cuda_array_interface__``) with one fused numba-cuda kernel per parameter
(``lstmeng.backends._cuda_optim``), with the optimizer's moments allocated
next to the parameter once and kept there. numba is imported only when a
device array is met.

Example:
    >>> import numpy as np, lstmeng as le
    >>> lstm = le.LSTM(4, seed=0)
    >>> optimizer = le.optim.Adam(lstm, lr=1e-2)
    >>> x, target = np.ones((2, 3, 5), np.float32), np.zeros((2, 4), np.float32)
    >>> for _ in range(3):
    ...     y = lstm(x, training=True)
    ...     _ = lstm.backward(2 * (y - target) / y.size)
    ...     norm = le.optim.clip_grad_norm(lstm, max_norm=1.0)
    ...     optimizer.step()
    >>> optimizer.state_dict()["config"]["step"]
    3
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "clip_grad_norm"]

#: torch.nn.utils.clip_grad_norm_'s guard against dividing by a zero norm.
CLIP_EPSILON = 1e-6


# -- where arrays live -----------------------------------------------------------------------------------------
def _is_device_array(array) -> bool:
    """True for a CUDA array; decided without importing numba (host arrays never carry the interface)."""
    return not isinstance(array, np.ndarray) and hasattr(array, "__cuda_array_interface__")


def _device_kernels():
    """The numba-cuda side, imported on first use so that host-only users never import numba."""
    from lstmeng.backends import _cuda_optim
    return _cuda_optim


def _host_copy(array) -> np.ndarray:
    return _device_kernels().to_host(array) if _is_device_array(array) else np.array(array, copy=True)


def _dtype_of(array) -> np.dtype:
    if isinstance(array, np.ndarray):
        return array.dtype
    dtype = array.dtype
    if _is_device_array(array) and not isinstance(dtype, np.dtype):  # torch.float32 and the like
        dtype = _device_kernels().flat_view(array, "array").dtype
    return np.dtype(dtype)


def _shape_of(array) -> tuple:
    return tuple(array.shape)   # a plain tuple also for torch.Size


def _where(array) -> str:
    return "cuda" if _is_device_array(array) else "cpu"


def _zeros_like(array):
    return _device_kernels().zeros_like(array) if _is_device_array(array) else np.zeros_like(array)


def _place_like(host: np.ndarray, param):
    """``host`` copied next to ``param`` (same device), in param's dtype."""
    if _is_device_array(param):
        return _device_kernels().to_device(host, _dtype_of(param))
    return np.array(host, dtype=param.dtype, copy=True)


# -- models ----------------------------------------------------------------------------------------------------
def _as_models(model) -> list:
    """``model`` (or a list of models) as a list, each checked to have ``params`` and ``grads`` mappings."""
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    if not models:
        raise ValueError("model: expected a model or a non-empty list of models, got an empty list")
    for index, item in enumerate(models):
        what = "model" if len(models) == 1 else f"model[{index}]"
        for attribute in ("params", "grads"):
            value = getattr(item, attribute, None)
            if not isinstance(value, Mapping):
                raise TypeError(f"{what}: expected an object with `params` and `grads` mappings of name -> array "
                                f"(an lstmeng layer or model), got {type(item).__name__} whose `{attribute}` is "
                                f"{type(value).__name__}")
    return models


def _named_arrays(models: list, attribute: str) -> dict:
    """``params`` or ``grads`` of every model, read now; names get a ``"<index>."`` prefix for several models."""
    prefix = len(models) > 1
    return {(f"{index}.{name}" if prefix else name): array
            for index, item in enumerate(models) for name, array in getattr(item, attribute).items()}


@dataclasses.dataclass
class _Parameter:
    """One parameter of a step: its name, the live array and its gradient (both updated in place)."""

    name: str
    value: object
    grad: object


def _check_float(array, what: str) -> None:
    if not (isinstance(array, np.ndarray) or _is_device_array(array)):
        raise TypeError(f"{what}: expected a NumPy array or a CUDA array, got {type(array).__name__}")
    dtype = _dtype_of(array)
    if dtype.kind != "f":
        raise TypeError(f"{what}: expected a floating-point array, got dtype {dtype}")


def _parameters_with_grads(models: list) -> list[_Parameter]:
    """Every parameter with its gradient, all checked (present, float, same shape, dtype and device).

    Raises before anything is changed, so a failing call leaves every array as it was.
    """
    params, grads = _named_arrays(models, "params"), _named_arrays(models, "grads")
    if not params:
        raise ValueError("model has no parameters yet: build it (model.build(input_size)) or call it once first")
    missing = [name for name in params if name not in grads]
    if missing:
        raise ValueError(f"grads missing for {missing} (of {sorted(params)}): call backward() before step()")
    checked = []
    for name, value in params.items():
        grad = grads[name]
        _check_float(value, f"params[{name!r}]")
        _check_float(grad, f"grads[{name!r}]")
        if _shape_of(grad) != _shape_of(value):
            raise ValueError(f"grads[{name!r}] has shape {_shape_of(grad)}, but the parameter has "
                             f"{_shape_of(value)}")
        if _dtype_of(grad) != _dtype_of(value):
            raise TypeError(f"grads[{name!r}] has dtype {_dtype_of(grad)}, but the parameter has "
                            f"{_dtype_of(value)}")
        if isinstance(value, np.ndarray) and not value.flags.writeable:
            raise ValueError(f"params[{name!r}] is read-only: the optimizer updates parameters in place")
        if _where(grad) != _where(value):
            raise ValueError(f"grads[{name!r}] is on {_where(grad)} but the parameter is on {_where(value)}: "
                             f"keep both on one device")
        checked.append(_Parameter(name, value, grad))
    return checked


# -- checks of hyperparameters ---------------------------------------------------------------------------------
def _check_number(value, name: str, *, minimum: float = 0.0, below: float | None = None) -> float:
    """``value`` as a float, checked finite, ``>= minimum`` and (if given) ``< below``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number) or number < minimum or (below is not None and number >= below):
        interval = f"[{minimum:g}, {below:g})" if below is not None else f">= {minimum:g}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
    return number


def _check_betas(betas) -> list[float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    return [_check_number(beta, f"betas[{index}]", below=1.0) for index, beta in enumerate(betas)]


# -- optimizers --------------------------------------------------------------------------------------------------
class Optimizer:
    """What SGD, Adam and AdamW share: the models, the step count, per-parameter state and its (de)serialisation.

    Subclasses define ``_checked_config`` (validate hyperparameters), ``_slot_names``
    (their per-parameter state arrays) and ``_update`` (one parameter's step).

    Attributes:
        config: the hyperparameters (JSON-able); change them between steps through
            ``lr`` or by assigning ``config`` a full dict (it is validated at every step).
        step_count: steps taken (the bias-correction step of Adam).
    """

    def __init__(self, model, config: dict):
        self._models = _as_models(model)
        self.config = self._checked_config(config)
        self.step_count = 0
        #: parameter name -> slot name -> array next to the parameter.
        self._state: dict[str, dict[str, object]] = {}

    # Subclasses fill these in.
    @classmethod
    def _checked_config(cls, config: dict) -> dict:
        raise NotImplementedError

    @classmethod
    def _slot_names(cls, config: dict) -> tuple[str, ...]:
        raise NotImplementedError

    def _update(self, parameter: _Parameter, slots: dict, step: int) -> None:
        raise NotImplementedError

    @property
    def lr(self) -> float:
        """The learning rate (assign to change it, e.g. from a schedule)."""
        return self.config["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        self.config = self._checked_config({**self.config, "lr": value})

    def __repr__(self) -> str:
        options = ", ".join(f"{key}={value!r}" for key, value in self.config.items())
        return f"{type(self).__name__}({options}, step={self.step_count})"

    # -- the public calls -----------------------------------------------------------------------------------
    def step(self) -> None:
        """Update every parameter in place from its current gradient.

        Raises:
            ValueError, TypeError: a gradient is missing or does not match its
                parameter (nothing is changed then).
        """
        config = self._checked_config(self.config)
        parameters = _parameters_with_grads(self._models)
        slot_names = self._slot_names(config)
        for parameter in parameters:
            slots = self._state.get(parameter.name, {})
            for slot, array in slots.items():
                if _shape_of(array) != _shape_of(parameter.value):
                    raise ValueError(f"optimizer state {slot!r} of {parameter.name!r} has shape {_shape_of(array)}, "
                                     f"but the parameter now has {_shape_of(parameter.value)}")
        step = self.step_count + 1
        for parameter in parameters:
            slots = self._state.setdefault(parameter.name, {})
            for slot in slot_names:
                array = slots.get(slot)
                if array is None:
                    slots[slot] = _zeros_like(parameter.value)
                elif _where(array) != _where(parameter.value) or _dtype_of(array) != _dtype_of(parameter.value):
                    # The layer moved (to("cuda")) or changed dtype: the state follows it once.
                    slots[slot] = _place_like(_host_copy(array), parameter.value)
            self._update(parameter, slots, step)
        self.step_count = step

    def zero_grad(self) -> None:
        """Set every gradient to zero, in place (on its device)."""
        for name, grad in _named_arrays(self._models, "grads").items():
            _check_float(grad, f"grads[{name!r}]")
            if _is_device_array(grad):
                _device_kernels().fill_zero(grad)
            else:
                grad[...] = 0

    def state_dict(self) -> dict:
        """The optimizer's configuration and state, on the host.

        Returns:
            ``{"config": {"optimizer": class name, <hyperparameters>, "step": int},
            "state": {"<slot>/<parameter name>": np.ndarray}}``: the config is
            JSON-able, the arrays are host copies (``le.save(..., optimizer=...)``
            stores exactly this).

        Example:
            >>> import lstmeng as le
            >>> le.optim.SGD(le.LSTM(3).build(2), lr=0.1).state_dict()["config"]
            {'optimizer': 'SGD', 'lr': 0.1, 'momentum': 0.0, 'nesterov': False, 'weight_decay': 0.0, 'step': 0}
        """
        state = {f"{slot}/{name}": _host_copy(array)
                 for name, slots in self._state.items() for slot, array in slots.items()}
        return {"config": {"optimizer": type(self).__name__, **self.config, "step": self.step_count},
                "state": state}

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Restore what ``state_dict()`` returned (hyperparameters, step count, state) onto the parameters' devices.

        Everything is checked before anything changes.

        Raises:
            ValueError, TypeError: naming what does not match (optimizer type,
                a hyperparameter, parameter names, a state array's shape).
        """
        if not isinstance(state_dict, Mapping) or not {"config", "state"} <= set(state_dict):
            keys = sorted(state_dict) if isinstance(state_dict, Mapping) else "-"
            raise ValueError("state_dict must be a mapping with 'config' and 'state' (what state_dict() returns), "
                             f"got {type(state_dict).__name__} with keys {keys}")
        saved = dict(state_dict["config"])
        kind = saved.pop("optimizer", None)
        if kind != type(self).__name__:
            raise ValueError(f"state_dict is for optimizer {kind!r}, this is {type(self).__name__!r}")
        step = saved.pop("step", None)
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"state_dict config 'step' must be an integer >= 0, got {step!r}")
        expected_keys, saved_keys = set(self.config), set(saved)
        if saved_keys != expected_keys:
            raise ValueError(f"state_dict config has hyperparameters {sorted(saved_keys)}, "
                             f"{type(self).__name__} has {sorted(expected_keys)}")
        config = self._checked_config(saved)

        params = _named_arrays(self._models, "params")
        slot_names = self._slot_names(config)
        arrays = dict(state_dict["state"])
        expected = {f"{slot}/{name}" for name in params for slot in slot_names} if step > 0 and slot_names else set()
        if set(arrays) != expected:
            missing, unexpected = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
            raise ValueError(f"state_dict state does not match this model's parameters (step {step}): "
                             f"missing {missing}, unexpected {unexpected}")
        restored: dict[str, dict[str, object]] = {}
        for key, array in arrays.items():
            slot, name = key.split("/", 1)
            array = np.asarray(array)
            if _shape_of(array) != _shape_of(params[name]):
                raise ValueError(f"state_dict state {key!r} has shape {_shape_of(array)}, "
                                 f"but parameter {name!r} has {_shape_of(params[name])}")
            restored.setdefault(name, {})[slot] = array
        # Copies go to the device only after every check has passed.
        self._state = {name: {slot: _place_like(array, params[name]) for slot, array in slots.items()}
                       for name, slots in restored.items()}
        self.config = config
        self.step_count = int(step)


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, Nesterov momentum and L2 weight decay (torch.optim.SGD).

    ``d = grad + weight_decay * param``; with momentum
    ``buffer = momentum * buffer + d`` (``buffer = d`` at the first step) and
    ``d = buffer`` (or ``d + momentum * buffer`` with Nesterov);
    ``param -= lr * d``. No dampening.

    Args:
        model: a layer or model with ``params``/``grads`` (or a list of them).
        lr: learning rate, >= 0.
        momentum: in [0, 1); 0 keeps no state.
        nesterov: Nesterov momentum (needs momentum > 0).
        weight_decay: L2 penalty coefficient, >= 0.

    Example:
        >>> import lstmeng as le
        >>> optimizer = le.optim.SGD(le.LSTM(3).build(2), lr=0.1, momentum=0.9, nesterov=True)
    """

    def __init__(self, model, lr: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0):
        super().__init__(model, {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay})

    @classmethod
    def _checked_config(cls, config: dict) -> dict:
        checked = {"lr": _check_number(config["lr"], "lr"),
                   "momentum": _check_number(config["momentum"], "momentum", below=1.0),
                   "nesterov": config["nesterov"],
                   "weight_decay": _check_number(config["weight_decay"], "weight_decay")}
        if not isinstance(checked["nesterov"], bool):
            raise TypeError(f"nesterov must be True or False, got {checked['nesterov']!r}")
        if checked["nesterov"] and checked["momentum"] == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        return checked

    @classmethod
    def _slot_names(cls, config: dict) -> tuple[str, ...]:
        return ("momentum_buffer",) if config["momentum"] else ()

    def _update(self, parameter: _Parameter, slots: dict, step: int) -> None:
        lr, momentum, nesterov, weight_decay = (self.config[key] for key in
                                                ("lr", "momentum", "nesterov", "weight_decay"))
        buffer = slots.get("momentum_buffer") if momentum else None
        if _is_device_array(parameter.value):
            _device_kernels().sgd_update(parameter.value, parameter.grad, buffer, lr=lr, momentum=momentum,
                                         nesterov=nesterov, weight_decay=weight_decay)
            return
        direction = parameter.grad + weight_decay * parameter.value if weight_decay else parameter.grad
        if momentum:
            buffer *= momentum
            buffer += direction          # a zero buffer makes the first step buffer = direction
            direction = direction + momentum * buffer if nesterov else buffer
        parameter.value -= lr * direction


class Adam(Optimizer):
    """Adam (Kingma & Ba, 2015) with bias correction; weight decay is L2 added to the gradient (torch.optim.Adam).

    ``g = grad + weight_decay * param``; ``m += (1 - beta1) * (g - m)``;
    ``v = beta2 * v + (1 - beta2) * g * g``;
    ``param -= lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)``.

    Args:
        model: a layer or model with ``params``/``grads`` (or a list of them).
        lr: learning rate, >= 0.
        betas: ``(beta1, beta2)``, each in [0, 1).
        eps: added to the denominator, >= 0.
        weight_decay: L2 penalty coefficient, >= 0.

    Example:
        >>> import lstmeng as le
        >>> optimizer = le.optim.Adam(le.LSTM(3).build(2), lr=1e-3)
    """

    _decoupled = False

    def __init__(self, model, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(model, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @classmethod
    def _checked_config(cls, config: dict) -> dict:
        return {"lr": _check_number(config["lr"], "lr"), "betas": _check_betas(config["betas"]),
                "eps": _check_number(config["eps"], "eps"),
                "weight_decay": _check_number(config["weight_decay"], "weight_decay")}

    @classmethod
    def _slot_names(cls, config: dict) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def _update(self, parameter: _Parameter, slots: dict, step: int) -> None:
        lr, eps, weight_decay = self.config["lr"], self.config["eps"], self.config["weight_decay"]
        beta1, beta2 = self.config["betas"]
        step_size = lr / (1.0 - beta1 ** step)
        bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** step)
        exp_avg, exp_avg_sq = slots["exp_avg"], slots["exp_avg_sq"]
        if _is_device_array(parameter.value):
            _device_kernels().adam_update(parameter.value, parameter.grad, exp_avg, exp_avg_sq, beta1=beta1,
                                          beta2=beta2, step_size=step_size,
                                          bias_correction2_sqrt=bias_correction2_sqrt, eps=eps,
                                          weight_decay=weight_decay, decoupled=self._decoupled, lr=lr)
            return
        param, grad = parameter.value, parameter.grad
        if weight_decay and self._decoupled:
            param *= 1.0 - lr * weight_decay
        elif weight_decay:
            grad = grad + weight_decay * param
        exp_avg += (1.0 - beta1) * (grad - exp_avg)        # torch's lerp (weight < 0.5)
        exp_avg_sq *= beta2
        exp_avg_sq += (1.0 - beta2) * (grad * grad)
        denominator = np.sqrt(exp_avg_sq)
        denominator /= bias_correction2_sqrt
        denominator += eps
        param -= step_size * (exp_avg / denominator)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019; torch.optim.AdamW).

    Each step first shrinks the parameter, ``param *= 1 - lr * weight_decay``,
    then takes Adam's step on the raw gradient.

    Args:
        model: a layer or model with ``params``/``grads`` (or a list of them).
        lr: learning rate, >= 0.
        betas: ``(beta1, beta2)``, each in [0, 1).
        eps: added to the denominator, >= 0.
        weight_decay: decoupled decay coefficient, >= 0 (default 1e-2, as torch).

    Example:
        >>> import lstmeng as le
        >>> optimizer = le.optim.AdamW(le.LSTM(3).build(2), lr=1e-3, weight_decay=1e-2)
    """

    _decoupled = True

    def __init__(self, model, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        super().__init__(model, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


# -- gradient clipping ---------------------------------------------------------------------------------------------
def clip_grad_norm(model, max_norm: float) -> float:
    """Scale every gradient in place so that their global L2 norm is at most ``max_norm`` (clip_grad_norm_).

    The norm is taken over all gradients together; when it exceeds
    ``max_norm`` every gradient is multiplied by
    ``max_norm / (norm + 1e-6)``, as torch.nn.utils.clip_grad_norm_ does. On
    the GPU the sum of squares is reduced on the device; returning the norm
    as a float costs one 8-byte device-to-host copy, which waits for the
    reduction.

    Args:
        model: a layer or model with ``grads`` (or a list of them).
        max_norm: the largest allowed norm, a finite number >= 0.

    Returns:
        The global norm before clipping, a Python float. An infinite norm
        scales every gradient by 0 (as torch); a NaN norm leaves them as they
        are (torch would turn them all to NaN).

    Example:
        >>> import numpy as np, lstmeng as le
        >>> lstm = le.LSTM(3).build(2)
        >>> lstm.grads = {name: np.full_like(value, 10.0) for name, value in lstm.params.items()}
        >>> round(le.optim.clip_grad_norm(lstm, max_norm=1.0), 3)    # 72 entries of 10: sqrt(7200)
        84.853
        >>> round(le.optim.clip_grad_norm(lstm, max_norm=1.0), 3)    # the norm after clipping
        1.0
    """
    max_norm = _check_number(max_norm, "max_norm")
    grads = _named_arrays(_as_models(model), "grads")
    for name, grad in grads.items():
        _check_float(grad, f"grads[{name!r}]")
    on_device = [grad for grad in grads.values() if _is_device_array(grad)]
    on_host = [grad for grad in grads.values() if not _is_device_array(grad)]
    squared = sum(float(np.sum(np.square(grad, dtype=np.float64))) for grad in on_host)
    if on_device:
        squared += _device_kernels().squared_norm(on_device)
    total_norm = math.sqrt(squared)
    clip_coefficient = max_norm / (total_norm + CLIP_EPSILON)
    if not clip_coefficient < 1.0:   # nothing to clip (torch multiplies by 1.0, which changes nothing)
        return total_norm
    for grad in on_device:
        _device_kernels().scale_in_place(grad, clip_coefficient)
    for grad in on_host:
        grad *= clip_coefficient
    return total_norm
