"""``le.fit``: the small training loop every script otherwise writes by hand.

One step is the explicit-backward loop of the README, nothing hidden::

    outputs = model(x, mask=mask, training=True)
    loss, doutputs = loss_function(outputs, targets[, mask])
    model.backward(doutputs)                     # replaces the gradients (a new tape round)
    clip_grad_norm(model, clip_norm)             # when clip_norm is given
    optimizer.step()

with batches drawn from arrays, a tqdm progress bar, a per-epoch history,
validation, early stopping on a monitored value and an optional loss plot
(matplotlib, when installed).

On the GPU (a model moved with ``to("cuda")``, trained with a built-in
loss) each batch is sliced from the host arrays and copied to the device
once (x in the model's dtype, ids as integers, targets and mask as they
are); outputs, the loss gradient and every gradient stay there, and only the
loss (a float) and, for metrics, the outputs come back to the host. A custom
loss callable gets host arrays, as on the CPU (the model copies in and out).
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np

from lstmeng import _validation, optim
from lstmeng import losses as losses_module
from lstmeng._arrays import array_dtype_name, host_copy
from lstmeng.backends import registry


@dataclasses.dataclass
class History:
    """What ``fit`` measured.

    Attributes:
        history: ``{"loss": [...], "val_loss": [...], "<metric>": [...], "val_<metric>": [...]}``,
            one value per epoch run (the training values are means over the epoch's batches).
        epochs_run: epochs completed (fewer than asked when early stopping fired).
        best_epoch: 1-based epoch with the best monitored value (None without a monitor).
        stopped_early: early stopping ended training.
    """

    history: dict
    epochs_run: int
    best_epoch: int | None = None
    stopped_early: bool = False


def accuracy(outputs, targets, mask=None) -> float:
    """Share of correct predictions: argmax over classes for ``[..., C]`` logits against ids (or one-hot),
    ``logit > 0`` against 0/1 targets for a single output."""
    outputs, targets = np.asarray(outputs), np.asarray(targets)
    if outputs.shape[-1] > 1 and outputs.shape != targets.shape:
        correct = np.argmax(outputs, axis=-1) == targets
    elif outputs.shape[-1] > 1:
        correct = np.argmax(outputs, axis=-1) == np.argmax(targets, axis=-1)
    else:
        correct = (outputs > 0) == (targets > 0.5)
    if mask is not None and correct.shape == np.shape(mask):
        return float(correct[np.asarray(mask)].mean()) if np.any(mask) else 0.0
    return float(correct.mean())


METRICS = {"accuracy": accuracy}


def _split(data, argument: str):
    """``(x, targets)`` or ``(x, targets, mask)`` -> three arrays (mask None), rows checked equal."""
    if not isinstance(data, (tuple, list)) or len(data) not in (2, 3):
        raise ValueError(f"{argument} must be a tuple (x, targets) or (x, targets, mask), got "
                         f"{type(data).__name__}" + (f" of length {len(data)}" if isinstance(data, (tuple, list))
                                                     else ""))
    x, targets = np.asarray(data[0]), np.asarray(data[1])
    mask = None if len(data) == 2 or data[2] is None else np.asarray(data[2])
    rows = {len(x), len(targets)} | ({len(mask)} if mask is not None else set())
    if len(rows) != 1:
        raise ValueError(f"{argument}: x, targets (and mask) must have the same number of rows, got "
                         f"{len(x)}, {len(targets)}" + (f", {len(mask)}" if mask is not None else ""))
    return x, targets, mask


def _positive_int(value, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{argument} must be an integer >= 1, got {value!r}")
    return int(value)


def _call(model, x, mask, training):
    return model(x, training=training) if mask is None else model(x, mask=mask, training=training)


def _loss(loss_function, outputs, targets, mask):
    """The loss of a batch; the mask goes to the loss when the outputs are per step (``[B, T, ...]``).
    Device arrays (a GPU batch) stay on the device."""
    if registry.array_kind(outputs) != "cuda":
        outputs = np.asarray(outputs)
    if mask is not None:
        shapes = [_validation.shape_of(array) for array in (outputs, targets, mask)]
        if shapes[0][:len(shapes[2])] == shapes[2] and shapes[1][:len(shapes[2])] == shapes[2]:
            return loss_function(outputs, targets, mask=mask)
    return loss_function(outputs, targets)


def _on_device(model, loss_function) -> bool:
    """True when batches go to the GPU before the model sees them: a model on "cuda" trained with a built-in
    loss, which computes on device arrays (a custom loss gets host arrays; the model then copies in and out)."""
    return getattr(model, "device", "cpu") != "cpu" and loss_function in set(losses_module.LOSSES.values())


def _to_device(model, x, targets, mask):
    """One batch copied to the GPU, once: x in the dtype of the model's first parameter (ids stay
    integers), targets and mask as they are. As it is while the model has no parameters yet (its first
    call builds it and copies x in) or when its first parameter is on the host (a model whose first
    layer is on the CPU takes host input)."""
    first = next(iter(model.params.values()), None)
    if first is None or registry.array_kind(first) != "cuda":
        return x, targets, mask
    ops = registry.get_backend_object("numba_cuda").ops
    if not np.issubdtype(x.dtype, np.integer):
        x = _validation.check_numeric_array(x, "x", np.dtype(array_dtype_name(first)))
    return (ops.asarray(x, x.dtype), ops.asarray(targets, targets.dtype),
            None if mask is None else ops.asarray(mask, mask.dtype))


def _host_outputs(outputs) -> np.ndarray:
    """The outputs as a host array for metrics (a device batch's are copied out)."""
    return host_copy(outputs) if registry.array_kind(outputs) == "cuda" else np.asarray(outputs)


def evaluate(model, loss, data, batch_size: int = 256, metrics=()) -> dict:
    """Mean loss and metrics of ``model`` on ``data`` (inference calls: no tape is touched).

    Returns:
        ``{"loss": float, "<metric>": float, ...}``, means over rows.
    """
    loss_function = losses_module.get(loss)
    x, targets, mask = _split(data, "data")
    metric_functions = _metric_functions(metrics)
    on_device = _on_device(model, loss_function)
    totals = dict.fromkeys(["loss", *metric_functions], 0.0)
    for start in range(0, len(x), batch_size):
        rows = slice(start, start + batch_size)
        batch_mask = None if mask is None else mask[rows]
        batch = (x[rows], targets[rows], batch_mask)
        if on_device:
            batch = _to_device(model, *batch)
        outputs = _call(model, batch[0], batch[2], training=False)
        if registry.array_kind(outputs) != "cuda":
            outputs = np.asarray(outputs)
        count = len(x[rows])
        totals["loss"] += _loss(loss_function, outputs, batch[1], batch[2])[0] * count
        if metric_functions:
            outputs = _host_outputs(outputs)
        for name, function in metric_functions.items():
            totals[name] += function(outputs, targets[rows], batch_mask) * count
    return {name: total / max(len(x), 1) for name, total in totals.items()}


def _metric_functions(metrics) -> dict:
    functions = {}
    for metric in metrics or ():
        if isinstance(metric, str):
            if metric not in METRICS:
                raise ValueError(f"metrics: unknown metric {metric!r}; known: {sorted(METRICS)} (or pass a "
                                 "callable (outputs, targets, mask) -> float)")
            functions[metric] = METRICS[metric]
        elif callable(metric):
            functions[getattr(metric, "__name__", f"metric{len(functions)}")] = metric
        else:
            raise TypeError(f"metrics: expected names or callables, got {type(metric).__name__}")
    return functions


def fit(model, loss, optimizer, data, *, epochs: int = 1, batch_size: int = 32, validation_data=None,
        metrics=(), monitor: str | None = None, patience: int | None = None, mode: str = "auto",
        restore_best_weights: bool = True, clip_norm: float | None = None, shuffle: bool = True,
        seed: int | None = None, progress: bool = True, plot: str | None = None) -> History:
    """Train ``model`` on arrays with explicit backward passes and an ``lstmeng.optim`` optimizer.

    Args:
        model: anything with ``__call__(x, [mask=], training=)``, ``backward(doutputs)``, ``params``,
            ``grads`` (a ``le.Sequential``, a layer, your own model).
        loss: a name from ``le.losses.LOSSES`` or a callable ``(outputs, targets[, mask]) -> (loss, doutputs)``.
        optimizer: an ``le.optim`` optimizer built on ``model`` (``le.optim.Adam(model)``).
        data: ``(x, targets)`` or ``(x, targets, mask)``, arrays with one row per example. The mask
            ``[N, T]`` is passed to the model, and to the loss when the outputs are per step.
        epochs: passes over ``data``. batch_size: rows per step.
        validation_data: like ``data``; evaluated after every epoch (inference calls).
        metrics: names (``"accuracy"``) or callables ``(outputs, targets, mask) -> float``.
        monitor: the history key early stopping watches; default ``"val_loss"`` with validation data,
            else ``"loss"``.
        patience: stop once ``monitor`` has not improved for this many epochs in a row (Keras's
            EarlyStopping); None never stops.
        mode: "min", "max" or "auto" (max for names containing "acc", else min).
        restore_best_weights: with patience, end with the weights of the best epoch.
        clip_norm: clip the global gradient norm to this before each step (``le.optim.clip_grad_norm``).
        shuffle, seed: shuffle the rows each epoch, reproducibly with ``seed``.
        progress: a tqdm bar per epoch (on stderr).
        plot: a PNG path for the loss curves (needs matplotlib; a warning when it is missing).

    Returns:
        a ``History``.

    Raises:
        FloatingPointError: a batch's loss is NaN or infinite (naming epoch and batch).

    Example:
        >>> import numpy as np, lstmeng as le
        >>> model = le.Sequential([le.LSTM(8, seed=0), le.Dense(1, seed=1)])
        >>> x = np.random.default_rng(0).normal(size=(64, 5, 2)).astype("float32")
        >>> y = x.sum(axis=(1, 2))[:, None]
        >>> history = le.fit(model, "mse", le.optim.Adam(model, lr=1e-2), (x, y), epochs=3,
        ...                  batch_size=16, progress=False, seed=0)
        >>> len(history.history["loss"]), history.history["loss"][-1] < history.history["loss"][0]
        (3, True)
    """
    loss_function = losses_module.get(loss)
    if not callable(getattr(optimizer, "step", None)):
        raise TypeError(f"optimizer must be an lstmeng.optim optimizer (with step()), got {type(optimizer).__name__}")
    epochs, batch_size = _positive_int(epochs, "epochs"), _positive_int(batch_size, "batch_size")
    x, targets, mask = _split(data, "data")
    if validation_data is not None:
        _split(validation_data, "validation_data")
    metric_functions = _metric_functions(metrics)
    monitor = monitor or ("val_loss" if validation_data is not None else "loss")
    if monitor.startswith("val_") and validation_data is None:
        raise ValueError(f"monitor={monitor!r} needs validation_data")
    known = ["loss", *metric_functions] + ([f"val_{name}" for name in ["loss", *metric_functions]]
                                           if validation_data is not None else [])
    if monitor not in known:
        raise ValueError(f"monitor must be one of {known}, got {monitor!r}")
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
    higher_is_better = mode == "max" or (mode == "auto" and "acc" in monitor)
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 0):
        raise ValueError(f"patience must be an integer >= 0 or None, got {patience!r}")

    on_device = _on_device(model, loss_function)
    rng = np.random.default_rng(seed)
    history = {name: [] for name in known}
    best_value, best_epoch, best_weights, waited = None, None, None, 0
    stopped = False
    epochs_run = 0
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(x)) if shuffle else np.arange(len(x))
        starts = range(0, len(x), batch_size)
        bar = _progress_bar(len(starts), f"epoch {epoch}/{epochs}", progress)
        sums = dict.fromkeys(["loss", *metric_functions], 0.0)
        for batch_number, start in enumerate(starts, start=1):
            rows = order[start:start + batch_size]
            batch_mask = None if mask is None else mask[rows]
            batch = (x[rows], targets[rows], batch_mask)
            if on_device:
                batch = _to_device(model, *batch)
            outputs = _call(model, batch[0], batch[2], training=True)
            value, doutputs = _loss(loss_function, outputs, batch[1], batch[2])
            if not math.isfinite(value):
                bar.close()
                if hasattr(model, "reset_tape"):
                    model.reset_tape()   # the failed batch's tape is never backpropagated
                raise FloatingPointError(f"the loss is {value} at epoch {epoch}, batch {batch_number}; lower the "
                                         "learning rate, set clip_norm, or check the data for NaN/inf")
            _backward_without_input_grad(model, doutputs)
            if clip_norm is not None:
                optim.clip_grad_norm(model, clip_norm)
            optimizer.step()
            sums["loss"] += value * len(rows)
            if metric_functions:
                outputs = _host_outputs(outputs)
            for name, function in metric_functions.items():
                sums[name] += function(outputs, targets[rows], batch_mask) * len(rows)
            bar.set_postfix(loss=f"{sums['loss'] / min(start + len(rows), len(x)):.4f}", refresh=False)
            bar.update(1)
        for name, total in sums.items():
            history[name].append(total / len(x))
        if validation_data is not None:
            scores = evaluate(model, loss_function, validation_data, batch_size=max(batch_size, 256),
                              metrics=list(metric_functions.values()))
            for name, score in scores.items():
                history[f"val_{name}"].append(score)
        bar.set_postfix({name: f"{values[-1]:.4f}" for name, values in history.items()})
        bar.close()
        epochs_run = epoch
        current = history[monitor][-1]
        improved = best_value is None or (current > best_value if higher_is_better else current < best_value)
        if improved:
            best_value, best_epoch, waited = current, epoch, 0
            if patience is not None and restore_best_weights:
                best_weights = [np.array(w, copy=True) for w in model.get_weights()]
        else:
            waited += 1
            if patience is not None and waited >= patience:   # Keras's EarlyStopping counts so
                stopped = True
                break
    if stopped and best_weights is not None:
        model.set_weights(best_weights)
    if plot is not None:
        plot_history(history, plot)
    return History(history=history, epochs_run=epochs_run, best_epoch=best_epoch, stopped_early=stopped)


def plot_history(history: dict, path: str) -> bool:
    """Write the loss (and metric) curves per epoch to ``path`` (PNG); False with a warning without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        warnings.warn("plot: matplotlib is not installed, so no plot was written (pip install matplotlib)",
                      stacklevel=2)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name in history if not name.startswith("val_")]
    figure, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.5), squeeze=False)
    for axis, name in zip(axes[0], names):
        for key in (name, f"val_{name}"):
            if history.get(key):
                axis.plot(np.arange(1, len(history[key]) + 1), history[key], "o-", label=key)
        axis.set_xlabel("epoch")
        axis.set_title(name)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


class _NoBar:
    def set_postfix(self, *args, **kwargs):
        pass

    def update(self, count):
        pass

    def close(self):
        pass


def _progress_bar(total: int, description: str, enabled: bool):
    """A tqdm bar of ``total`` batches (on stderr), or a silent stand-in; le.fit and the demo use it."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=description, unit="batch", leave=True, dynamic_ncols=True)


def _backward_without_input_grad(model, doutputs) -> None:
    """``model.backward(doutputs)``, asking lstmeng's own models for no input gradient (``fit``
    never uses dx, and a recurrent first layer then skips its product); other models as given."""
    from lstmeng.bidirectional import Bidirectional
    from lstmeng.layers import LSTM
    from lstmeng.sequential import Sequential

    if isinstance(model, (Sequential, LSTM, Bidirectional)):
        model.backward(doutputs, input_grad=False)
    else:
        model.backward(doutputs)
