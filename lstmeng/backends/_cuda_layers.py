"""Dense, Embedding and the losses on the numba_cuda backend's device arrays.

What ``lstmeng.dense`` and ``lstmeng.losses`` launch when their arrays live on
the GPU, so that a whole model (Embedding -> LSTMs -> Dense -> loss) trains
without an activation crossing the bus:

* Dense: the products go through ``_cuda_gemm.launch_gemm`` (cuBLAS or the
  Numba tiled GEMM): ``x [M, F] @ kernel [F, N]`` forward, ``x^T dz`` and
  ``dz @ kernel^T`` backward, with ``M`` every leading axis of x flattened.
  The bias and the activation are one elementwise pass over the product
  (a linear layer folds its bias into the GEMM instead: one launch);
  softmax is one thread per row with the row's maximum subtracted. The
  bias gradient is ``_cuda_elementwise.column_sums``.
* Embedding: a gather of table rows, and a scatter-add backward with
  ``cuda.atomic.add``, so rows looked up several times sum their gradients
  in no fixed order: the table gradient is not bitwise deterministic from
  run to run (float32 sums may differ in the last bits). Device ids are
  range-checked by a reduction (the first out-of-range position) whose one
  8-byte result is copied to the host, which waits for the queued work.
* Losses: per row of ``[M, C]`` (softmax cross-entropy; mean squared error
  over the last axis) or per entry (binary cross-entropy), the loss term and
  the gradient in one launch, after a one-block launch that counts the
  mask's True entries. The loss terms are summed in float64 (one atomic add
  per block, so the last bits of the sum may vary with the order), and the
  sum, the count and a bad-target flag come back in one 24-byte copy: the
  loss is a Python float, as on the host, and that copy waits for the
  queued work (the one synchronisation of a training step that reports its
  loss).

Semantics are those of the host code in ``lstmeng.dense`` and
``lstmeng.losses`` (a test compares them in float64 and float32): the mask
counts entries, masked ones get a zero gradient, nothing counted gives loss
0.0 and zeros. Arguments are device arrays already checked by the callers
(shapes, dtypes, devices); shapes are documented on every kernel.

Launch-wide options (activation, dtype, bias, mask, target kind) are
closure constants of kernels built once per combination, as in
``_cuda_optim``: the inner loops never test them.

Imported only from the numba_cuda side (``lstmeng.dense`` and
``lstmeng.losses`` import it when they meet a device array): importing
lstmeng never imports numba.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float64

from lstmeng.backends import _cuda_elementwise as ew
from lstmeng.backends import _cuda_gemm as gemm
from lstmeng.backends.numba_cuda import backend as _backend

#: Threads per block of every launch here; a power of two (the block sums halve it).
THREADS = ew.ELEMENTWISE_THREADS
#: Dense activations that run here; "softmax" mixes the last axis (one thread per row).
ACTIVATIONS = ("linear", "tanh", "relu", "sigmoid", "softmax")


def _ops():
    return _backend.ops


def _rows(array, columns: int):
    """A C-contiguous device array ``[..., columns]`` as its ``[M, columns]`` view (a copy only if strided)."""
    device = _ops().contiguous(_ops().view(array))
    rows = int(np.prod(tuple(device.shape)[:-1])) if len(device.shape) > 1 else 1
    return device.reshape(rows, columns)


def _flat(array):
    """A C-contiguous device array as its ``[N]`` view (a copy only if strided)."""
    device = _ops().contiguous(_ops().view(array))
    return device.reshape(int(device.size))


def _launch(count: int):
    return ew.blocks_for(count, THREADS), THREADS


# -- Dense: activations ----------------------------------------------------------------------------
def _elementwise_functions(activation: str, scalar):
    """(activate(z), derivative(y, dy)) device functions of one Dense activation in ``scalar`` arithmetic,
    written as ``lstmeng.dense`` writes them on the host (sigmoid in its overflow-free tanh form)."""
    ZERO, ONE, HALF = scalar(0), scalar(1), scalar(0.5)
    if activation == "linear":
        def activate(z):
            return z

        def derivative(y, dy):
            return dy
    elif activation == "tanh":
        def activate(z):
            return math.tanh(z)

        def derivative(y, dy):
            return dy * (ONE - y * y)
    elif activation == "relu":
        def activate(z):
            return max(z, ZERO)

        def derivative(y, dy):
            return dy if y > ZERO else ZERO
    elif activation == "sigmoid":
        def activate(z):
            return HALF * (ONE + math.tanh(HALF * z))

        def derivative(y, dy):
            return dy * y * (ONE - y)
    else:
        raise ValueError(f"no elementwise Dense activation {activation!r}")
    return cuda.jit(device=True)(activate), cuda.jit(device=True)(derivative)


@functools.lru_cache(maxsize=None)
def _activation_forward_kernel(activation: str, dtype_name: str, with_bias: bool):
    """The in-place bias + activation pass over a Dense product, for one combination (compile-time)."""
    scalar = np.dtype(dtype_name).type
    ZERO = scalar(0)
    if activation == "softmax":
        @cuda.jit
        def softmax_rows(z, bias):
            """z: [M, N] the product x @ kernel, overwritten with softmax(z + bias) over each row
            (shifted by the row's maximum: no overflow); bias: [N], or a [1] placeholder."""
            columns = z.shape[1]
            for m in range(cuda.grid(1), z.shape[0], cuda.gridsize(1)):
                largest = z[m, 0] + (bias[0] if with_bias else ZERO)
                for n in range(columns):
                    value = z[m, n] + (bias[n] if with_bias else ZERO)
                    z[m, n] = value
                    largest = max(largest, value)
                total = ZERO
                for n in range(columns):
                    value = math.exp(z[m, n] - largest)
                    z[m, n] = value
                    total += value
                for n in range(columns):
                    z[m, n] = z[m, n] / total

        return softmax_rows

    activate, _ = _elementwise_functions(activation, scalar)

    @cuda.jit
    def activate_in_place(z, bias):
        """z: [M, N] the product x @ kernel, overwritten with activation(z + bias); bias: [N], or a
        [1] placeholder."""
        columns = z.shape[1]
        for flat in range(cuda.grid(1), z.shape[0] * columns, cuda.gridsize(1)):
            m, n = flat // columns, flat % columns
            value = z[m, n]
            if with_bias:
                value += bias[n]
            z[m, n] = activate(value)

    return activate_in_place


@functools.lru_cache(maxsize=None)
def _activation_backward_kernel(activation: str, dtype_name: str):
    """dz from the activation's output y and dy (softmax: its Jacobian-vector product per row)."""
    scalar = np.dtype(dtype_name).type
    ZERO = scalar(0)
    if activation == "softmax":
        @cuda.jit
        def softmax_rows_backward(y, dy, dz):
            """dz[m, n] = y[m, n] * (dy[m, n] - sum over k of dy[m, k] * y[m, k]); y, dy, dz: [M, N]."""
            columns = y.shape[1]
            for m in range(cuda.grid(1), y.shape[0], cuda.gridsize(1)):
                inner = ZERO
                for n in range(columns):
                    inner += dy[m, n] * y[m, n]
                for n in range(columns):
                    dz[m, n] = y[m, n] * (dy[m, n] - inner)

        return softmax_rows_backward

    _, derivative = _elementwise_functions(activation, scalar)

    @cuda.jit
    def elementwise_backward(y, dy, dz):
        """dz[m, n] = dy[m, n] * activation'(z) written from y = activation(z); y, dy, dz: [M, N]."""
        columns = y.shape[1]
        for flat in range(cuda.grid(1), y.shape[0] * columns, cuda.gridsize(1)):
            m, n = flat // columns, flat % columns
            dz[m, n] = derivative(y[m, n], dy[m, n])

    return elementwise_backward


# -- Dense -------------------------------------------------------------------------------------------
def dense_forward(x, kernel, bias, activation: str):
    """``y = activation(x @ kernel + bias)`` on the device.

    Args:
        x: [..., F] device array (any strides; copied once if not C-contiguous).
        kernel: [F, N] C-contiguous device array; bias: [N] or None.
        activation: one of ``ACTIVATIONS``.

    Returns:
        y: [..., N], a fresh device array.
    """
    features, units = (int(n) for n in kernel.shape)
    dtype = np.dtype(kernel.dtype)
    y = _ops().empty(tuple(x.shape)[:-1] + (units,), dtype)
    rows = _rows(x, features)
    out = y.reshape(int(rows.shape[0]), units)
    if not out.size:
        return y
    fold_bias = activation == "linear"   # nothing elementwise left: the GEMM adds the bias
    gemm.launch_gemm(rows, kernel, out, bias if fold_bias else None)
    if fold_bias:
        return y
    with_bias = bias is not None
    launch = _activation_forward_kernel(activation, dtype.name, with_bias)
    placeholder = bias if with_bias else _backend._dummy(1, dtype)
    count = int(out.shape[0]) if activation == "softmax" else int(out.size)
    launch[_launch(count)](out, placeholder)
    return y


def _gradient_array(given, shape: tuple, dtype, accumulate: bool):
    """Where a weight gradient of ``shape`` is written: ``given`` itself when it is a C-contiguous
    device array of that shape and dtype (a GPU layer's previous gradient: no allocation), else a
    fresh array (holding ``given``'s values when ``accumulate``: the sum continues there)."""
    ops = _ops()
    if given is not None and ops.owns(given):
        view = ops.view(given)
        if tuple(view.shape) == shape and np.dtype(view.dtype) == dtype and view.is_c_contiguous():
            return view
    if accumulate and given is not None:
        return ops.copy(ops.asarray(given, dtype), dtype)
    return ops.empty(shape, dtype)


def _column_sums_into(matrix, out, accumulate: bool) -> None:
    """out[n] (+)= sum over m of matrix[m, n]; matrix: [M, N]; out: [N]."""
    if not accumulate:
        ew.fill_1d[_launch(int(out.size))](out, 0)
    rows, columns = (int(n) for n in matrix.shape)
    if rows and columns:
        ew.column_sums[(math.ceil(columns / THREADS), math.ceil(rows / ew.COLUMN_SUM_ROWS)), THREADS](matrix, out)


def dense_backward(x, y, dy, kernel, activation: str, use_bias: bool, grads_out: dict, accumulate: bool):
    """The backward of ``dense_forward``.

    Args:
        x: [..., F] the forward's input; y: [..., N] its output; dy: [..., N] (device arrays).
        kernel: [F, N] the forward's kernel.
        grads_out: the layer's current gradients ("kernel" [F, N], "bias" [N]), written in place
            when they are C-contiguous device arrays of the right shape and dtype.
        accumulate: add to the current gradients (a later backward of one tape round) instead of
            replacing them.

    Returns:
        (dx [..., F] fresh, {"kernel": dkernel, "bias": dbias} on the device).
    """
    features, units = (int(n) for n in kernel.shape)
    dtype = np.dtype(kernel.dtype)
    ops = _ops()
    x_rows, y_rows, dy_rows = _rows(x, features), _rows(y, units), _rows(dy, units)
    rows = int(x_rows.shape[0])
    grads = {"kernel": _gradient_array(grads_out.get("kernel"), (features, units), dtype, accumulate)}
    if use_bias:
        grads["bias"] = _gradient_array(grads_out.get("bias"), (units,), dtype, accumulate)
    dx = ops.empty(tuple(x.shape), dtype)
    if rows == 0:   # no product to take: the gradients are zero (or stay as they are)
        if not accumulate:
            for gradient in grads.values():
                ew.fill_1d[_launch(int(gradient.size))](gradient.reshape(int(gradient.size)), 0)
        return dx, grads
    if activation == "linear":
        dz, scratch = dy_rows, None
    else:
        dz = scratch = _backend._scratch((rows, units), dtype)
        launch = _activation_backward_kernel(activation, dtype.name)
        launch[_launch(rows if activation == "softmax" else rows * units)](y_rows, dy_rows, dz)
    gemm.launch_gemm(x_rows, dz, grads["kernel"], transpose_a=True, accumulate=accumulate)
    if use_bias:
        _column_sums_into(dz, grads["bias"], accumulate)
    gemm.launch_gemm(dz, kernel, dx.reshape(rows, features), transpose_b=True)
    _backend._release(scratch)   # every launch that reads it is queued (one stream)
    return dx, grads


# -- Embedding ----------------------------------------------------------------------------------------
@cuda.jit
def _first_out_of_range(ids, limit, first):
    """first[0] = the smallest i with ids[i] outside [0, limit); ids: [N] integers; first: [1] int64,
    set to N by the caller (N: none)."""
    for i in range(cuda.grid(1), ids.shape[0], cuda.gridsize(1)):
        value = ids[i]
        if value < 0 or value >= limit:
            cuda.atomic.min(first, 0, i)


@cuda.jit
def _gather_rows(ids, table, out):
    """out[m, e] = table[ids[m], e]; ids: [M] in [0, V); table: [V, E]; out: [M, E]."""
    width = out.shape[1]
    for flat in range(cuda.grid(1), out.shape[0] * width, cuda.gridsize(1)):
        m, e = flat // width, flat % width
        out[m, e] = table[int(ids[m]), e]


@cuda.jit
def _scatter_add_rows(ids, dy, table_grad):
    """table_grad[ids[m], e] += dy[m, e] (atomic: repeated ids add in no fixed order);
    ids: [M] in [0, V); dy: [M, E]; table_grad: [V, E]."""
    width = dy.shape[1]
    for flat in range(cuda.grid(1), dy.shape[0] * width, cuda.gridsize(1)):
        m, e = flat // width, flat % width
        cuda.atomic.add(table_grad, (int(ids[m]), e), dy[m, e])


@cuda.jit
def _nonzero(ids, out):
    """out[i] = ids[i] != 0; ids: [N] integers; out: [N] bool."""
    for i in range(cuda.grid(1), ids.shape[0], cuda.gridsize(1)):
        out[i] = ids[i] != 0


@cuda.jit
def _both(a, b, out):
    """out[i] = a[i] and b[i]; a, b, out: [N] bool."""
    for i in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        out[i] = a[i] and b[i]


def first_out_of_range(ids, limit: int):
    """The first position (a tuple into ``ids``' shape, in C order) of an id outside ``[0, limit)``,
    or None; ids: device integers of any shape.

    One reduction launch and an 8-byte copy to the host, which waits for the work queued before it.
    """
    flat = _flat(ids)
    size = int(flat.size)
    if not size:
        return None
    first = _backend._scratch((1,), np.int64)
    try:
        ew.fill_1d[1, 1](first, size)
        _first_out_of_range[_launch(size)](flat, limit, first)
        index = int(_ops().to_numpy(first)[0])
    finally:
        _backend._release(first)
    if index >= size:
        return None
    return tuple(int(i) for i in np.unravel_index(index, tuple(ids.shape)))


def embedding_lookup(ids, table):
    """out [..., E] = table [V, E] rows of ids [...] (device integers, already range-checked); fresh."""
    width = int(table.shape[1])
    out = _ops().empty(tuple(ids.shape) + (width,), np.dtype(table.dtype))
    if out.size:
        _gather_rows[_launch(int(out.size))](_flat(ids), table, out.reshape(int(out.size) // width, width))
    return out


def embedding_backward(ids, dy, table_grad, shape: tuple, dtype, accumulate: bool):
    """The table's gradient ``[V, E]``: every row the sum of the dy rows ``[..., E]`` of its ids.

    ``table_grad``: the layer's current gradient, written in place when usable (as Dense's); with
    ``accumulate`` the sums are added to it. Returns the gradient (a device array).
    """
    dtype = np.dtype(dtype)
    gradient = _gradient_array(table_grad, tuple(shape), dtype, accumulate)
    if not accumulate:
        ew.fill_1d[_launch(int(gradient.size))](gradient.reshape(int(gradient.size)), 0)
    width = int(shape[1])
    dy_rows = _rows(dy, width)
    if dy_rows.size:
        _scatter_add_rows[_launch(int(dy_rows.size))](_flat(ids), dy_rows, gradient)
    return gradient


def nonzero_mask(ids):
    """Bool device array ``ids != 0`` of ids' shape (Embedding's mask_zero mask)."""
    out = _ops().empty(tuple(ids.shape), np.bool_)
    if out.size:
        _nonzero[_launch(int(out.size))](_flat(ids), out.reshape(int(out.size)))
    return out


def logical_and(a, b):
    """Bool device array ``a & b`` (two bool device arrays of one shape)."""
    out = _ops().empty(tuple(a.shape), np.bool_)
    if out.size:
        _both[_launch(int(out.size))](_flat(a), _flat(b), out.reshape(int(out.size)))
    return out


# -- losses --------------------------------------------------------------------------------------------
# The accumulator of one loss launch: [loss total, counted entries, bad-target flag], float64.
_TOTAL, _COUNT, _BAD = 0, 1, 2


@cuda.jit(device=True)
def _add_block_total(partial, shared, accumulator):
    """accumulator[0] += the sum of every thread's ``partial`` in this block (one atomic per block).
    Every thread of the block must call it; shared: [THREADS] float64."""
    total = ew.block_sum(partial, shared)
    if cuda.threadIdx.x == 0:
        cuda.atomic.add(accumulator, _TOTAL, total)


@cuda.jit
def _count_mask(mask, per_entry, accumulator):
    """accumulator = [0, per_entry * (True entries of mask), 0]; mask: [M] bool; one block of THREADS."""
    shared = cuda.shared.array(THREADS, float64)
    thread = cuda.threadIdx.x
    count = 0.0
    for i in range(thread, mask.shape[0], THREADS):
        if mask[i]:
            count += 1.0
    total = ew.block_sum(count, shared)
    if thread == 0:
        accumulator[_TOTAL] = 0.0
        accumulator[_COUNT] = total * per_entry
        accumulator[_BAD] = 0.0


@cuda.jit
def _set_count(count, accumulator):
    """accumulator = [0, count, 0] (no mask: every entry counts); one thread."""
    if cuda.grid(1) == 0:
        accumulator[_TOTAL] = 0.0
        accumulator[_COUNT] = count
        accumulator[_BAD] = 0.0


@functools.lru_cache(maxsize=None)
def _squared_error_kernel(dtype_name: str, has_mask: bool):
    scalar = np.dtype(dtype_name).type
    ZERO, TWO = scalar(0), scalar(2)

    @cuda.jit
    def squared_error(predictions, targets, mask, accumulator, gradient):
        """Rows of mean_squared_error: the sum of (p - t)**2 over counted rows into accumulator[0],
        gradient = 2 (p - t) / count (zero on masked rows, and everywhere when count is 0).
        predictions, targets, gradient: [M, F]; mask: [M] bool or a [1] placeholder."""
        shared = cuda.shared.array(THREADS, float64)
        count = accumulator[_COUNT]
        divisor = scalar(count)
        columns = predictions.shape[1]
        partial = 0.0
        for m in range(cuda.grid(1), predictions.shape[0], cuda.gridsize(1)):
            counted = count > 0.0 and (mask[m] if has_mask else True)
            for f in range(columns):
                if counted:
                    error = predictions[m, f] - scalar(targets[m, f])
                    partial += error * error
                    gradient[m, f] = TWO * error / divisor
                else:
                    gradient[m, f] = ZERO
        _add_block_total(partial, shared, accumulator)

    return squared_error


@functools.lru_cache(maxsize=None)
def _cross_entropy_kernel(dtype_name: str, has_mask: bool, class_ids: bool):
    scalar = np.dtype(dtype_name).type
    ZERO, ONE = scalar(0), scalar(1)

    @cuda.jit
    def cross_entropy(logits, targets, mask, accumulator, gradient):
        """Rows of softmax_cross_entropy: -sum_c p_c log softmax(z)_c over counted rows into
        accumulator[0], gradient = (softmax(z) * sum_c p_c - p) / count. logits, gradient: [M, C];
        targets: class ids [M] (an id outside [0, C) sets accumulator[2]) or probabilities [M, C];
        mask: [M] bool or a [1] placeholder."""
        shared = cuda.shared.array(THREADS, float64)
        count = accumulator[_COUNT]
        divisor = scalar(count)
        classes = logits.shape[1]
        partial = 0.0
        for m in range(cuda.grid(1), logits.shape[0], cuda.gridsize(1)):
            target = -1
            if class_ids:
                target = int(targets[m])
                if target < 0 or target >= classes:
                    accumulator[_BAD] = 1.0   # the caller raises; this row's numbers are never used
                    target = -1
            counted = count > 0.0 and (mask[m] if has_mask else True)
            if not counted:
                for c in range(classes):
                    gradient[m, c] = ZERO
                continue
            largest = logits[m, 0]
            for c in range(classes):
                largest = max(largest, logits[m, c])
            total = ZERO
            for c in range(classes):
                total += math.exp(logits[m, c] - largest)
            log_total = math.log(total)
            mass = ONE
            if not class_ids:
                mass = ZERO
                for c in range(classes):
                    mass += scalar(targets[m, c])
            for c in range(classes):
                log_probability = logits[m, c] - largest - log_total
                if class_ids:
                    probability = ONE if c == target else ZERO
                else:
                    probability = scalar(targets[m, c])
                partial -= probability * log_probability
                gradient[m, c] = (math.exp(log_probability) * mass - probability) / divisor
        _add_block_total(partial, shared, accumulator)

    return cross_entropy


@functools.lru_cache(maxsize=None)
def _binary_cross_entropy_kernel(dtype_name: str, has_mask: bool):
    scalar = np.dtype(dtype_name).type
    ZERO, ONE, HALF = scalar(0), scalar(1), scalar(0.5)

    @cuda.jit
    def binary_cross_entropy(logits, targets, mask, accumulator, gradient):
        """Entries of binary_cross_entropy: log(1 + e^z) - z t (no exp overflows) over counted
        entries into accumulator[0], gradient = (sigmoid(z) - t) / count with sigmoid in tanh
        form. logits, targets, gradient: [N]; mask: [N] bool or a [1] placeholder."""
        shared = cuda.shared.array(THREADS, float64)
        count = accumulator[_COUNT]
        divisor = scalar(count)
        partial = 0.0
        for i in range(cuda.grid(1), logits.shape[0], cuda.gridsize(1)):
            if count > 0.0 and (mask[i] if has_mask else True):
                z, t = logits[i], scalar(targets[i])
                softplus = max(z, ZERO) + math.log1p(math.exp(-abs(z)))
                partial += softplus - z * t
                gradient[i] = (HALF * (ONE + math.tanh(HALF * z)) - t) / divisor
            else:
                gradient[i] = ZERO
        _add_block_total(partial, shared, accumulator)

    return binary_cross_entropy


def _run_loss(kernel, rows: int, predictions, targets, mask, gradient, per_entry: int):
    """Launch the counting prologue and ``kernel`` over ``rows``; returns (loss, bad_target) as host
    values after one 24-byte copy of the accumulator (which waits for the launches)."""
    accumulator = _backend._scratch((3,), np.float64)
    try:
        if mask is None:
            _set_count[1, 1](float(rows * per_entry), accumulator)
            mask = _backend._dummy(1, np.bool_)
        else:
            _count_mask[1, THREADS](mask, float(per_entry), accumulator)
        if rows:
            kernel[_launch(rows)](predictions, targets, mask, accumulator, gradient)
        total, count, bad = (float(value) for value in _ops().to_numpy(accumulator))
    finally:
        _backend._release(accumulator)
    return (total / count if count else 0.0), bool(bad)


def mean_squared_error(predictions, targets, mask):
    """(loss, gradient) of ``lstmeng.losses.mean_squared_error`` on device arrays.

    Args:
        predictions: [..., F] float; targets: [..., F] numeric; mask: [...] bool or None.

    Returns:
        (the mean over counted elements as a float, the gradient [..., F], fresh).
    """
    dtype = np.dtype(predictions.dtype)
    columns = int(tuple(predictions.shape)[-1])
    gradient = _ops().empty(tuple(predictions.shape), dtype)
    rows = _rows(predictions, columns)
    count = int(rows.shape[0])
    kernel = _squared_error_kernel(dtype.name, mask is not None)
    loss, _ = _run_loss(kernel, count, rows, _rows(targets, columns), None if mask is None else _flat(mask),
                        gradient.reshape(count, columns), columns)
    return loss, gradient


def softmax_cross_entropy(logits, targets, mask, class_ids: bool):
    """(loss, gradient, bad_target) of ``lstmeng.losses.softmax_cross_entropy`` on device arrays.

    Args:
        logits: [..., C] float; targets: class ids [...] (``class_ids``) or probabilities [..., C];
        mask: [...] bool or None.

    Returns:
        (mean loss over counted positions, gradient [..., C] fresh, True when a class id lies
        outside [0, C): the caller raises, the numbers are then meaningless).
    """
    dtype = np.dtype(logits.dtype)
    classes = int(tuple(logits.shape)[-1])
    gradient = _ops().empty(tuple(logits.shape), dtype)
    rows = _rows(logits, classes)
    count = int(rows.shape[0])
    target_rows = _flat(targets) if class_ids else _rows(targets, classes)
    kernel = _cross_entropy_kernel(dtype.name, mask is not None, bool(class_ids))
    loss, bad = _run_loss(kernel, count, rows, target_rows, None if mask is None else _flat(mask),
                          gradient.reshape(count, classes), 1)
    return loss, gradient, bad


def binary_cross_entropy(logits, targets, mask):
    """(loss, gradient) of ``lstmeng.losses.binary_cross_entropy`` on device arrays.

    Args:
        logits: [...] float; targets: [...] numeric in [0, 1]; mask: [...] bool or None.

    Returns:
        (the mean over counted entries as a float, the gradient of logits' shape, fresh).
    """
    dtype = np.dtype(logits.dtype)
    gradient = _ops().empty(tuple(logits.shape), dtype)
    entries = int(gradient.size)
    kernel = _binary_cross_entropy_kernel(dtype.name, mask is not None)
    loss, _ = _run_loss(kernel, entries, _flat(logits), _flat(targets), None if mask is None else _flat(mask),
                        gradient.reshape(entries), 1)
    return loss, gradient
