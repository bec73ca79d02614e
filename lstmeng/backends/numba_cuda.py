"""The numba_cuda backend: LSTM forward and backward on NVIDIA GPUs with numba-cuda kernels.

No CUDA C++ and no cuDNN: every kernel is Python compiled by ``numba.cuda.jit``.

* Input projection of all time steps: one tiled shared-memory GEMM launch,
  bias folded in (``_cuda_gemm``).
* Recurrence: ONE cooperative launch per layer and direction, one grid
  barrier per step, each block owning a slice of hidden units with its slice
  of the recurrent weights in shared memory when it fits
  (``_cuda_recurrence``). The backward mirrors it in reverse time; the weight
  gradients are GEMMs over all steps.
* Arrays: NumPy arrays are copied in and the results copied out (the
  training workspace stays on the device; the array helpers keep host
  arrays on the host); any
  object with ``__cuda_array_interface__`` (Numba device arrays, CuPy,
  PyTorch CUDA tensors) is used in place, without a copy. The array helpers
  (``backend.ops``, a ``CudaArrayOps``: add, concatenate, flip_time, ...) run
  as small kernels, so a Sequential or
  Bidirectional model on the GPU never round-trips through the host. Results
  are Numba device arrays (``numba.cuda.cudadrv.devicearray.DeviceNDArray``);
  ``cupy.asarray(result)`` or ``torch.as_tensor(result, device="cuda")`` wrap
  them without a copy.
* Memory: scratch and training workspaces come from a bounded device pool
  (``_device_pool``; ``release_buffers()`` empties it), default states and
  state gradients are shared read-only zero arrays, and a GPU layer's weight
  gradients are written into its previous ones (``grads_out``), so a training
  loop allocates only its outputs. Layers on the GPU keep their weights here
  as device arrays (``LSTM.to("cuda")``): nothing is copied per call.

Streams: every launch goes to Numba's default stream, which orders it with
PyTorch's and CuPy's default streams; work queued on other streams must be
synchronised by the caller. The pool relies on that one stream: a block
handed out again is only written by launches queued after its last reader.

Under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, set before numba is
imported) the same kernels run in Python, slowly, for tests: the backend then
reports "CUDA simulator" as its device and returns simulator arrays that carry
a ``__cuda_array_interface__`` so that the layers treat them exactly as device
arrays. A cooperative grid is one block there (see ``_cuda_recurrence``).

Example (on a machine with a GPU)::

    import numpy as np, lstmeng as le
    from numba import cuda
    x = cuda.to_device(np.random.rand(8, 100, 256).astype("float32"))
    lstm = le.LSTM(256, return_sequences=True)      # "auto" picks numba_cuda for device arrays
    y = lstm(x)                                      # a device array [8, 100, 256]
"""

from __future__ import annotations

import dataclasses
import math
from importlib import metadata

import numpy as np

from lstmeng.backends import _kernel_overrides
from lstmeng.backends.base import ArrayOps, KernelBackend, SequenceForward, SequenceGrads, Workspace, numpy_dtype

try:  # numba is optional: without it the backend reports itself unavailable.
    import numba
    from numba import cuda
    _IMPORT_ERROR = None
except Exception as error:  # ImportError, or a broken numba/CUDA toolkit install
    numba = cuda = None
    _IMPORT_ERROR = error

#: Default CUDA limit on dynamic shared memory per block without opting in.
DEFAULT_SHARED_LIMIT_BYTES = 48 * 1024


def simulator_enabled() -> bool:
    """True when numba runs CUDA kernels in its Python simulator (NUMBA_ENABLE_CUDASIM=1)."""
    return numba is not None and bool(numba.config.ENABLE_CUDASIM)


def _numba_cuda_version() -> str:
    try:
        return metadata.version("numba-cuda")
    except metadata.PackageNotFoundError:
        return f"bundled with numba {numba.__version__}"


@dataclasses.dataclass
class _Workspace(Workspace):
    """What ``sequence_backward`` needs from a training forward (device arrays).

    x: [B, T, I] the input before input dropout: the caller's device array
    itself (referenced, not copied, any strides), or for a host input its
    device copy, which is the input's residence on the device (the only copy
    kept); h_in, c_prev: [B, T, H]; gates: [B, T, 4H] activated; mask,
    seen_before: [B, T] bool or None; last_output_rows: [B] bool or None;
    kernel: [I, 4H]; recurrent_kernel: [H, 4H]; input_dropout_mask: [B, I]
    or None; recurrent_dropout_mask: [B, H] or None.

    That is 6H values per (row, step), the theoretical workspace: the
    backward kernel recomputes activation(c(t)) from the gates and c(t-1),
    and the dropped-out input for the dkernel GEMM is a temporary of the
    backward. h_in, c_prev, gates, seen_before and last_output_rows come from
    the backend's device pool and go back to it when the backward has run.
    """

    x: object
    h_in: object
    c_prev: object
    gates: object
    mask: object
    seen_before: object
    last_output_rows: object
    kernel: object
    recurrent_kernel: object
    input_dropout_mask: object
    recurrent_dropout_mask: object


#: Most bytes of idle scratch the device pool keeps between calls (see ``_device_pool``).
DEVICE_POOL_MAX_BYTES = 1 << 30
#: Most shapes of shared read-only zero arrays kept (``zeros_constant``).
CONSTANT_ZEROS_KEPT = 16


class CudaArrayOps(ArrayOps):
    """The array helpers on CUDA arrays: Numba device arrays and any object with
    ``__cuda_array_interface__`` (CuPy, PyTorch CUDA tensors), used in place.

    Host arrays given to the helpers stay on the host (NumPy's helpers), so
    NumPy in gives NumPy out and device arrays never round-trip through the
    host. The elementwise helpers (add, concatenate, flip_time, ...) run as
    small kernels (``_cuda_elementwise``). Beyond the ``ArrayOps`` contract it
    holds the device-array plumbing the numba_cuda backend's kernels use:
    ``view`` (a Numba view of any CUDA array), ``empty``, ``wrap`` (the
    simulator's array class), ``copy``, ``copy_into``, ``contiguous``.
    """

    def __init__(self):
        self._constant_zeros: dict = {}

    def release_constants(self) -> None:
        """Forget the shared zero arrays of ``zeros_constant``."""
        self._constant_zeros.clear()

    def owns(self, array) -> bool:
        if cuda is None:
            return False
        if simulator_enabled():
            # Simulator arrays, and stand-ins for CuPy/torch arrays in tests: any object
            # with a CUDA array interface (its "device" memory is host memory there).
            return isinstance(array, _fake_array_class()) or hasattr(array, "__cuda_array_interface__")
        return cuda.is_cuda_array(array)

    def view(self, array):
        """A numba device array viewing ``array`` (one of ours or any CUDA array): no copy."""
        if simulator_enabled():
            return _simulated(array)
        from numba.cuda.cudadrv.devicearray import DeviceNDArray
        if isinstance(array, DeviceNDArray):
            return _canonical_view(array)
        return _canonical_view(cuda.as_cuda_array(array))

    def empty(self, shape, dtype):
        """An uninitialised device array (the simulator's array class under the simulator)."""
        return _simulated(cuda.device_array(tuple(shape), dtype=np.dtype(dtype))) if simulator_enabled() \
            else cuda.device_array(tuple(shape), dtype=np.dtype(dtype))

    def asarray(self, array, dtype):
        dtype = np.dtype(dtype)
        if self.owns(array):
            device = self.view(array)
            if device.dtype == dtype:
                return device
            return self.copy(device, dtype)
        host = _canonical_host(np.asarray(array, dtype=dtype))
        device = cuda.to_device(host)
        return _simulated(device) if simulator_enabled() else device

    def to_numpy(self, array) -> np.ndarray:
        if not self.owns(array):
            return np.asarray(array)
        device = self.view(array)
        if not device.is_c_contiguous():
            device = self.copy(device, device.dtype)
        return device.copy_to_host()

    def zeros(self, shape, dtype):
        out = self.empty(shape, dtype)
        if out.size:
            from lstmeng.backends import _cuda_elementwise as ew
            ew.fill_1d[ew.blocks_for(out.size), ew.ELEMENTWISE_THREADS](out.reshape(out.size), 0)
        return out

    def zeros_constant(self, shape, dtype):
        """A shared zero array that no caller writes: default initial states and state
        gradients, without a fill launch and an allocation per call."""
        key = (tuple(int(n) for n in shape), np.dtype(dtype).name)
        zeros = self._constant_zeros.get(key)
        if zeros is None:
            if len(self._constant_zeros) >= CONSTANT_ZEROS_KEPT:
                self._constant_zeros.pop(next(iter(self._constant_zeros)))   # the oldest shape
            zeros = self._constant_zeros[key] = self.zeros(key[0], dtype)
        return zeros

    def expand_time(self, x):
        if not self.owns(x):
            return super().expand_time(x)
        x = self.contiguous(self.view(x))
        return self.wrap(x.reshape(x.shape[0], 1, x.shape[1]))

    def swap_batch_time(self, x):
        return self._permute(x, 0) if self.owns(x) else super().swap_batch_time(x)

    def flip_time(self, y):
        return self._permute(y, 1) if self.owns(y) else super().flip_time(y)

    def add(self, a, b):
        return self._binary(1, a, b) if self.owns(a) or self.owns(b) else super().add(a, b)

    def multiply(self, a, b):
        return self._binary(2, a, b) if self.owns(a) or self.owns(b) else super().multiply(a, b)

    def scale(self, a, factor: float):
        return self._binary(3, a, None, factor) if self.owns(a) else super().scale(a, factor)

    def concatenate(self, arrays, axis: int = -1):
        if not any(self.owns(array) for array in arrays):
            return super().concatenate(arrays, axis)
        pieces = [self.asarray(array, np.result_type(array.dtype)) if not self.owns(array) else self.view(array)
                  for array in arrays]
        ndim = len(pieces[0].shape)
        if axis not in (-1, ndim - 1):
            raise NotImplementedError(f"numba_cuda concatenates along the last axis only, got axis={axis}")
        # tuple(): the simulator's shapes take no negative indices.
        shape = tuple(pieces[0].shape)[:-1] + (sum(tuple(p.shape)[-1] for p in pieces),)
        out = self.empty(shape, pieces[0].dtype)
        start = 0
        for piece in pieces:
            width = tuple(piece.shape)[-1]
            self.copy_into(piece, _last_axis_slice(out, start, start + width))
            start += width
        return out

    def split_last(self, array, sizes):
        if not self.owns(array):
            return super().split_last(array, sizes)
        device = self.view(array)
        pieces, start = [], 0
        for size in sizes:
            pieces.append(self.copy(_last_axis_slice(device, start, start + size), device.dtype))
            start += size
        return pieces

    def wrap(self, device):
        """``device`` as the array class callers get: the simulator's subclass there, itself on a GPU."""
        return _simulated(device) if simulator_enabled() else device

    def copy_into(self, source, target):
        """target[...] = source (cast to target's dtype); any strides, same shape."""
        from lstmeng.backends import _cuda_elementwise as ew
        size = int(np.prod(target.shape))
        if size:
            ew.BINARY_KERNELS[len(target.shape)][ew.blocks_for(size), ew.ELEMENTWISE_THREADS](
                ew.OP_COPY, source, source, 0.0, target)

    def copy(self, source, dtype):
        """A fresh C-contiguous device copy of ``source`` in ``dtype``."""
        out = self.empty(source.shape, dtype)
        self.copy_into(source, out)
        return out

    def contiguous(self, device):
        """``device`` itself when C-contiguous, else a contiguous copy."""
        return device if device.is_c_contiguous() else self.copy(device, device.dtype)

    def _binary(self, op, a, b, factor=0.0):
        from lstmeng.backends import _cuda_elementwise as ew
        a = self.view(a) if self.owns(a) else self.asarray(a, np.result_type(b.dtype))
        b = a if b is None else self.asarray(b, a.dtype)
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError(f"numba_cuda elementwise operands must have equal shapes, got "
                             f"{tuple(a.shape)} and {tuple(b.shape)}")
        out = self.empty(a.shape, a.dtype)
        size = int(np.prod(a.shape))
        if size:
            ew.BINARY_KERNELS[len(a.shape)][ew.blocks_for(size), ew.ELEMENTWISE_THREADS](
                op, a, b, float(factor), out)
        return out

    def _permute(self, x, mode):
        from lstmeng.backends import _cuda_elementwise as ew
        x = self.view(x)
        if len(x.shape) != 3:
            raise NotImplementedError(f"numba_cuda swaps and flips 3-D arrays, got shape {tuple(x.shape)}")
        n0, n1, n2 = (int(n) for n in x.shape)
        shape = (n1, n0, n2) if mode == ew.PERMUTE_SWAP_01 else (n0, n1, n2)
        out = self.empty(shape, x.dtype)
        if n0 * n1 * n2:
            ew.permute_3d[ew.blocks_for(n0 * n1 * n2), ew.ELEMENTWISE_THREADS](mode, x, out)
        return out


class NumbaCudaBackend(KernelBackend):
    """LSTM on NVIDIA GPUs through numba-cuda kernels (float32 and float64)."""

    name = "numba_cuda"
    dtypes = ("float32", "float64")
    #: ``sequence_backward`` may write the weight gradients into arrays the caller passes.
    accepts_grads_out = True

    def __init__(self):
        self._partitions: dict = {}
        self._dummies: dict = {}
        #: The array helpers on this backend's device arrays.
        self.ops = CudaArrayOps()
        self._pool = None   # created at the first scratch request (needs a device)
        #: GPU recurrence launches so far: (direction, dtype, H, rows per chunk) ->
        #: (blocks, threads, units per block, weights in shared memory, shared bytes).
        self.launch_log: dict = {}

    # -- availability ------------------------------------------------------------
    def probe(self) -> str:
        if _IMPORT_ERROR is not None:
            raise NotImplementedError(
                f"numba-cuda is not installed or failed to import ({type(_IMPORT_ERROR).__name__}: "
                f"{_IMPORT_ERROR}); install it with pip install 'lstmeng[cuda]'")
        if simulator_enabled():
            _check_compile_and_launch()
            return f"CUDA simulator (NUMBA_ENABLE_CUDASIM=1, numba-cuda {_numba_cuda_version()}): for tests, not speed"
        try:
            available = cuda.is_available()
            device = cuda.get_current_device() if available else None
        except Exception as error:  # CudaSupportError: no driver library, driver too old, ...
            raise NotImplementedError(f"no usable CUDA driver or GPU: {str(error).strip()}") from None
        if device is None:
            raise NotImplementedError("no CUDA GPU found (numba.cuda.is_available() is False: "
                                      "no NVIDIA driver, or no GPU visible to this process)")
        _check_compile_and_launch()
        name = device.name.decode() if isinstance(device.name, bytes) else str(device.name)
        major, minor = device.compute_capability
        return (f"GPU: {name} (compute capability {major}.{minor}, {device.MULTIPROCESSOR_COUNT} SMs), "
                f"numba-cuda {_numba_cuda_version()}")

    # -- device arrays -------------------------------------------------------------
    def device_index(self) -> int:
        """Numba's current CUDA device (the one every launch goes to); 0 under the simulator."""
        if simulator_enabled():
            return 0
        return int(cuda.get_current_device().id)


    # -- scratch memory ------------------------------------------------------------
    def _scratch(self, shape, dtype):
        """An uninitialised device array from the pool, for arrays that never reach the caller;
        hand it back with ``_release`` once the launches that use it are queued."""
        if not int(np.prod(shape)):
            return self.ops.empty(shape, dtype)
        if self._pool is None:
            from lstmeng.backends._device_pool import DevicePool
            self._pool = DevicePool(lambda nbytes: cuda.device_array(nbytes, dtype=np.uint8),
                                    DEVICE_POOL_MAX_BYTES, wrap=self.ops.wrap)
        return self._pool.take(shape, dtype)

    def _release(self, *arrays) -> None:
        if self._pool is not None:
            self._pool.give(*arrays)

    def release_buffers(self) -> None:
        """Free the device pool's idle scratch and the shared zero arrays."""
        if self._pool is not None:
            self._pool.clear()
        self.ops.release_constants()

    def pool_allocations(self) -> int:
        """Device blocks the scratch pool has allocated so far (flat in a steady training loop)."""
        return 0 if self._pool is None else self._pool.allocations

    # -- kernel helpers ------------------------------------------------------------------
    def _gemm_input(self, x, input_dropout_mask):
        """x ``[B, T, I]`` times the ``[B, I]`` input dropout mask (or None), C-contiguous.

        That is the GEMMs' ``[B*T, I]`` operand: x itself when it is
        contiguous and there is no dropout, else a fresh array that the caller
        uses and drops (the workspace keeps x only).
        """
        from lstmeng.backends import _cuda_elementwise as ew
        if input_dropout_mask is None:
            return self.ops.contiguous(x)
        out = self._scratch(tuple(x.shape), x.dtype)
        ew.scale_rows_3d[ew.blocks_for(out.size), ew.ELEMENTWISE_THREADS](x, input_dropout_mask, out)
        return out


    def _dummy(self, ndim, dtype):
        """A placeholder array [1]*ndim for kernel arguments a configuration does not use."""
        key = (ndim, np.dtype(dtype).name)
        if key not in self._dummies:
            self._dummies[key] = self.ops.zeros((1,) * ndim, dtype)
        return self._dummies[key]

    # -- the fused sequence call -----------------------------------------------------
    def sequence_forward(self, x, h0, c0, kernel, recurrent_kernel, bias, mask, input_dropout_mask,
                         recurrent_dropout_mask, options):
        from lstmeng.backends import _cuda_elementwise as ew
        from lstmeng.backends import _cuda_gemm as gemm

        options.check_arrays(bias, mask, input_dropout_mask, recurrent_dropout_mask)
        return_sequences, training = options.return_sequences, options.training

        dtype = numpy_dtype(x)
        copy_out = not self.ops.owns(x)   # host inputs get host results (the workspace stays on the device)
        x = self.ops.asarray(x, dtype)
        h0, c0 = self.ops.asarray(h0, dtype), self.ops.asarray(c0, dtype)
        kernel, recurrent_kernel = self.ops.asarray(kernel, dtype), self.ops.asarray(recurrent_kernel, dtype)
        bias = None if bias is None else self.ops.asarray(bias, dtype)
        batch, steps, features = (int(n) for n in x.shape)
        units = int(recurrent_kernel.shape[0])

        if input_dropout_mask is not None:
            input_dropout_mask = self.ops.asarray(input_dropout_mask, dtype)
        x_in = self._gemm_input(x, input_dropout_mask)   # a temporary unless it is x itself
        projection = self._scratch((batch, steps, 4 * units), dtype)
        gemm.launch_gemm(x_in.reshape(batch * steps, features), kernel,
                         projection.reshape(batch * steps, 4 * units), bias,
                         tiles=self._gemm_tiles(), dummy_bias=self._dummy(1, dtype))
        self._release(x_in)   # a no-op unless it came from the pool

        has_mask = mask is not None
        if has_mask:
            mask = self.ops.asarray(mask, np.bool_)
            seen_before = self._scratch((batch, steps), np.bool_)
            last_output_rows = self._scratch((batch,), np.bool_)
            ew.mask_summary[ew.blocks_for(batch), ew.ELEMENTWISE_THREADS](
                mask, options.reverse, options.zero_output_for_mask, seen_before, last_output_rows)
        else:
            mask = seen_before = self._dummy(2, np.bool_)
            last_output_rows = self._dummy(1, np.bool_)
        has_recurrent_dropout = recurrent_dropout_mask is not None
        recurrent_dropout = (self.ops.asarray(recurrent_dropout_mask, dtype) if has_recurrent_dropout
                             else self._dummy(2, dtype))

        h_buffers = self.ops.empty((2, batch, units), dtype)
        c_state = self.ops.empty((batch, units), dtype)
        outputs = self.ops.empty((batch, steps, units), dtype) if return_sequences else self._dummy(3, dtype)
        if training:
            h_in, c_prev = (self._scratch((batch, steps, units), dtype) for _ in range(2))
            gates = self._scratch((batch, steps, 4 * units), dtype)
        else:
            h_in = c_prev = gates = self._dummy(3, dtype)

        self._launch_recurrence(
            "forward", dtype, units, batch,
            (projection, recurrent_kernel, recurrent_dropout, mask, seen_before, h0, c0, h_buffers, c_state,
             outputs, h_in, c_prev, gates),
            options)

        self._release(projection)
        h = self.ops.wrap(h_buffers[steps % 2])   # a view: no extra launch
        if not return_sequences:
            outputs = self.ops.empty((batch, units), dtype)
            ew.select_rows[ew.blocks_for(outputs.size), ew.ELEMENTWISE_THREADS](
                h, last_output_rows, has_mask, outputs)
        if has_mask and not training:
            self._release(seen_before, last_output_rows)
        workspace = None
        if training:
            workspace = _Workspace(
                options, x=x, h_in=h_in, c_prev=c_prev, gates=gates,
                mask=mask if has_mask else None, seen_before=seen_before if has_mask else None,
                last_output_rows=last_output_rows if has_mask else None, kernel=kernel,
                recurrent_kernel=recurrent_kernel, input_dropout_mask=input_dropout_mask,
                recurrent_dropout_mask=recurrent_dropout if has_recurrent_dropout else None)
        if copy_out:
            outputs, h, c_state = self.ops.to_numpy(outputs), self.ops.to_numpy(h), self.ops.to_numpy(c_state)
        return SequenceForward(outputs=outputs, h=h, c=c_state, workspace=workspace)

    def sequence_backward(self, doutputs, dh, dc, workspace, grads_out=None, *, input_grad=True,
                          state_grads=True):
        """The contract's backward (``input_grad=False``: no dx GEMM, dx None; ``state_grads=False``:
        dh0 and dc0 None, computed all the same by the recurrence). ``grads_out``
        (numba_cuda only): None, or a dict with device arrays "kernel" [I, 4H], "recurrent_kernel"
        [H, 4H] and optionally "bias" [4H] that receive the weight gradients in place (a GPU
        layer's ``grads``: no allocation per step).
        The workspace's pooled arrays go back to the pool: each workspace is consumed once."""
        from lstmeng.backends import _cuda_elementwise as ew
        from lstmeng.backends import _cuda_gemm as gemm

        ws, options = workspace, workspace.options
        # Its pooled arrays go back to the pool below, to be reused: one backward per workspace.
        ws.consume(self.name)
        dtype = np.dtype(ws.gates.dtype)
        batch, steps, gate_columns = (int(n) for n in ws.gates.shape)
        units = gate_columns // 4
        features = int(ws.x.shape[2])
        copy_out = not self.ops.owns(doutputs)   # host gradients in, host gradients out
        doutputs = self.ops.asarray(doutputs, dtype)
        dh, dc = self.ops.asarray(dh, dtype), self.ops.asarray(dc, dtype)
        has_mask = ws.mask is not None

        dkernel, drecurrent_kernel, dbias = self._weight_grad_arrays(grads_out, features, gate_columns, dtype)
        dh_state = self.ops.empty((batch, units), dtype)
        dc_state = self.ops.empty((batch, units), dtype)
        # One launch sets dh_state (plus the last output's gradient on the rows where the
        # last output is the final h), dc_state and zeroes dbias for column_sums.
        ew.backward_prologue[ew.blocks_for(max(batch * units, gate_columns)), ew.ELEMENTWISE_THREADS](
            dh, dc, self._dummy(2, dtype) if options.return_sequences else doutputs,
            ws.last_output_rows if has_mask else self._dummy(1, np.bool_), not options.return_sequences, has_mask,
            dh_state, dc_state, dbias)
        scratch = self._scratch((batch, units), dtype)
        gate_grads = self._scratch((batch, steps, gate_columns), dtype)
        mask = ws.mask if has_mask else self._dummy(2, np.bool_)
        seen_before = ws.seen_before if has_mask else self._dummy(2, np.bool_)
        self._launch_recurrence(
            "backward", dtype, units, batch,
            (doutputs if options.return_sequences else self._dummy(3, dtype), ws.recurrent_kernel,
             ws.recurrent_dropout_mask if options.has_recurrent_dropout else self._dummy(2, dtype), mask,
             seen_before, ws.gates, ws.c_prev, dh_state, dc_state, scratch, gate_grads),
            options)

        # Weight gradients: GEMMs over all B*T rows at once.
        tiles, no_bias = self._gemm_tiles(), self._dummy(1, dtype)
        flat_gate_grads = gate_grads.reshape(batch * steps, gate_columns)
        x_in = self._gemm_input(ws.x, ws.input_dropout_mask)   # a temporary unless it is ws.x itself
        gemm.launch_gemm(x_in.reshape(batch * steps, features), flat_gate_grads, dkernel,
                         transpose_a=True, tiles=tiles, dummy_bias=no_bias)
        self._release(x_in, scratch)
        gemm.launch_gemm(ws.h_in.reshape(batch * steps, units), flat_gate_grads, drecurrent_kernel,
                         transpose_a=True, tiles=tiles, dummy_bias=no_bias)
        threads = ew.ELEMENTWISE_THREADS
        ew.column_sums[(math.ceil(gate_columns / threads), math.ceil(batch * steps / ew.COLUMN_SUM_ROWS)),
                       threads](flat_gate_grads, dbias)
        dx = None
        if input_grad:
            dx = self.ops.empty((batch, steps, features), dtype)
            gemm.launch_gemm(flat_gate_grads, ws.kernel, dx.reshape(batch * steps, features),
                             transpose_b=True, tiles=tiles, dummy_bias=no_bias)
            if ws.input_dropout_mask is not None:
                ew.scale_rows_3d[ew.blocks_for(dx.size), threads](dx, ws.input_dropout_mask, dx)
        # Every launch that reads them is queued (one stream): the memory can serve the next call.
        self._release(gate_grads, ws.h_in, ws.c_prev, ws.gates, ws.seen_before, ws.last_output_rows)
        if not state_grads:   # the recurrence forms them as it goes: dropped, not skipped
            dh_state = dc_state = None
        grads = SequenceGrads(dx=dx, dh0=dh_state, dc0=dc_state, dkernel=dkernel,
                              drecurrent_kernel=drecurrent_kernel, dbias=dbias)
        if copy_out:
            for field in dataclasses.fields(grads):
                value = getattr(grads, field.name)
                setattr(grads, field.name, None if value is None else self.ops.to_numpy(value))
        return grads

    def _weight_grad_arrays(self, grads_out, features, gate_columns, dtype):
        """(dkernel [I, 4H], drecurrent_kernel [H, 4H], dbias [4H]): the caller's arrays from
        ``grads_out`` where they have the right shape and dtype, else fresh ones."""
        shapes = {"kernel": (features, gate_columns), "recurrent_kernel": (gate_columns // 4, gate_columns),
                  "bias": (gate_columns,)}
        arrays = []
        for name, shape in shapes.items():
            given = None if grads_out is None else grads_out.get(name)
            usable = (given is not None and self.ops.owns(given) and tuple(given.shape) == shape
                      and numpy_dtype(given) == dtype and self.ops.view(given).is_c_contiguous())
            arrays.append(self.ops.view(given) if usable else self.ops.empty(shape, dtype))
        return tuple(arrays)

    def cell_backward(self, dh, dc, workspace) -> SequenceGrads:
        doutputs = self.ops.zeros_constant(tuple(dh.shape), workspace.gates.dtype)   # read only
        if not self.ops.owns(dh):
            doutputs = self.ops.to_numpy(doutputs)
        grads = self.sequence_backward(doutputs, dh, dc, workspace)
        batch, _, features = (int(n) for n in grads.dx.shape)
        dx = grads.dx.reshape(batch, features)
        grads.dx = dx if isinstance(dx, np.ndarray) else self.ops.wrap(dx)
        return grads

    # -- launch configuration ----------------------------------------------------------
    def _gemm_tiles(self):
        from lstmeng.backends import _cuda_gemm as gemm
        return gemm.SIMULATOR_TILES if simulator_enabled() else None   # None: chosen per GEMM shape

    def _recurrence_shape(self, dtype, batch: int):
        """Compile-time shape of the recurrence kernels for ``dtype`` and ``batch`` rows.

        On a GPU the rows per chunk shrink to the next power of two >= B for small
        batches (B = 1 computes one row, not 8 of which 7 are padding): a
        separately compiled kernel per row count, as register arrays need a
        compile-time size.
        """
        from lstmeng.backends import _cuda_recurrence as rec
        if simulator_enabled():
            return rec.SIMULATOR_SHAPE
        shape = rec.GPU_SHAPES[dtype.name]
        rows = min(shape.rows, 1 << max(0, int(batch) - 1).bit_length())
        return dataclasses.replace(shape, rows=rows)

    def _launch_recurrence(self, direction, dtype, units, batch, arrays, options):
        """Launch the forward or backward recurrence as one cooperative grid.

        ``arrays`` are the kernel's arguments before ``units_per_block``;
        ``units_per_block`` and ``weights_in_shared`` are appended here.
        ``options`` (the call's, the backward's: its forward's) select the
        compiled kernel: its flags are compile-time in both designs.

        Two designs: batches of at most ``SMALL_BATCH_MAX_ROWS`` rows run the
        small-batch kernels (``_cuda_recurrence_small``: a warp per unit, a
        counter barrier) when they fit this GPU; larger batches, and whatever
        the small design cannot hold, the general kernels. Each recurrence
        keeps its block's slice of the recurrent weights in shared memory when
        it fits (the fast path), else in global memory / L2. Tests and
        benchmarks force a design (``cuda_recurrence_design``: "small", an
        error when it does not apply, or "general") or global memory
        (``cuda_weights_in_shared=False``) with ``lstmeng.testing.kernel_overrides``.
        """
        from lstmeng.backends import _cuda_recurrence as rec
        from lstmeng.backends import _cuda_recurrence_small as small
        overrides = _kernel_overrides.current()
        design, weights_in_shared = overrides.cuda_recurrence_design, overrides.cuda_weights_in_shared
        if design != "general" and (design == "small" or batch <= small.SMALL_BATCH_MAX_ROWS):
            if small.launch(direction, dtype, units, batch, arrays, options, weights_in_shared=weights_in_shared,
                            allocate=self.ops.empty, allow_dynamic_shared=_allow_dynamic_shared,
                            launch_log=self.launch_log):
                return
            if design == "small":
                raise RuntimeError(f"numba_cuda: the small-batch {direction} recurrence does not apply to "
                                   f"B={batch}, H={units}, {dtype.name} on this device")
        shape = self._recurrence_shape(dtype, batch)
        make = rec.forward_kernel if direction == "forward" else rec.backward_kernel
        kernel = make(dtype, shape, options)
        if simulator_enabled():
            # The simulator's cooperative grids hold one block (it runs blocks in turn).
            in_shared = weights_in_shared is not False
            shared_bytes = shape.shared_values(units, units, in_shared) * dtype.itemsize
            kernel[1, shape.threads, 0, shared_bytes](*arrays, units, in_shared)
            return
        probe_arguments = (*arrays, units, False)
        launch = self._partition(direction, kernel, probe_arguments, dtype, units, shape,
                                 weights_in_shared=weights_in_shared)
        compiled, blocks, units_per_block, in_shared, shared_bytes = launch
        compiled[blocks, shape.threads, 0, shared_bytes](*arrays, units_per_block, in_shared)

    def _partition(self, direction, kernel, arguments, dtype, units, shape, *, weights_in_shared=None):
        """Grid size, unit slices and weight placement for one recurrence on this GPU (cached);
        weights_in_shared False (the ``cuda_weights_in_shared`` kernel override): global memory
        whatever fits."""
        from lstmeng.backends import _cuda_recurrence as rec
        compiled = kernel.specialize(*arguments)
        key = (direction, dtype.name, units, id(compiled), weights_in_shared is False)
        if key in self._partitions:
            return self._partitions[key]
        device = cuda.get_current_device()
        overload = next(iter(compiled.overloads.values()))
        try:
            optin_limit = int(device.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        except Exception:
            optin_limit = DEFAULT_SHARED_LIMIT_BYTES
        if weights_in_shared is False:
            optin_limit = 0
        max_blocks = int(device.MULTIPROCESSOR_COUNT)   # at most one block per SM
        for _ in range(64):
            units_per_block, blocks, in_shared = rec.choose_partition(
                units, dtype.itemsize, shape, max_blocks, optin_limit)
            shared_bytes = shape.shared_values(units, units_per_block, in_shared) * dtype.itemsize
            if shared_bytes > DEFAULT_SHARED_LIMIT_BYTES and not _allow_dynamic_shared(overload, shared_bytes):
                in_shared = False
                shared_bytes = shape.shared_values(units, units_per_block, False) * dtype.itemsize
            cooperative_limit = overload.max_cooperative_grid_blocks(shape.threads, shared_bytes)
            if blocks <= cooperative_limit:
                break
            if cooperative_limit >= 1:
                max_blocks = cooperative_limit      # fewer, larger unit slices
            elif optin_limit > 0:
                optin_limit = 0                     # weights from global memory: the smallest footprint
            else:
                break
        else:
            cooperative_limit = 0
        if blocks > cooperative_limit:
            raise RuntimeError(f"numba_cuda: the {direction} recurrence kernel cannot run as a cooperative grid "
                               f"on this GPU ({blocks} blocks of {shape.threads} threads with {shared_bytes} "
                               f"bytes of shared memory; the limit is {cooperative_limit} blocks)")
        self._partitions[key] = (compiled, blocks, units_per_block, in_shared, shared_bytes)
        self.launch_log[(direction, dtype.name, units, shape.rows)] = (
            blocks, shape.threads, units_per_block, in_shared, shared_bytes)
        return self._partitions[key]


def _allow_dynamic_shared(overload, nbytes: int) -> bool:
    """Raise the kernel's dynamic shared-memory limit above 48 KB through the CUDA driver.

    Numba's launch API stops at the default 48 KB; larger dynamic shared memory
    needs CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES set on the function
    first (what cudaFuncSetAttribute does in CUDA C++). Returns False when the
    driver refuses, so the caller reads the weights from global memory instead.
    """
    try:
        from numba.cuda.cudadrv import driver as numba_driver
        function = overload._codelibrary.get_cufunc()
        attribute = numba_driver.binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        try:
            numba_driver.driver.cuKernelSetAttribute(attribute, int(nbytes), function.handle, function.device.id)
        except Exception:
            numba_driver.driver.cuFuncSetAttribute(function.handle, attribute, int(nbytes))
        return True
    except Exception:
        return False


def _canonical_host(host: np.ndarray) -> np.ndarray:
    """``host`` C-contiguous with the strides NumPy gives a fresh array.

    NumPy calls ``x[:, ::-1]`` C-contiguous when the flipped axis has length 1,
    but keeps its negative stride; Numba's device arrays take the strides as
    they are, and slicing such an array gives a zero-length axis (the
    ``incompatible shape: (2, 0, 1) vs. (2, 1, 1)`` a batch of one-step
    sequences raised on the GPU). A copy with canonical strides avoids it.
    """
    host = np.ascontiguousarray(host)
    if host.strides != _c_strides(host.shape, host.itemsize):
        host = host.copy()
    return host


def _c_strides(shape, itemsize: int) -> tuple:
    strides, step = [], itemsize
    for extent in reversed(tuple(shape)):
        strides.append(step)
        step *= max(int(extent), 1)
    return tuple(reversed(strides))


def _canonical_view(device):
    """A device array with canonical C strides when it is C-contiguous under other strides
    (torch and CuPy may report any stride on an axis of length 1); no copy."""
    if device.size == 0 or not device.is_c_contiguous():
        return device
    canonical = _c_strides(device.shape, device.dtype.itemsize)
    if tuple(device.strides) == canonical:
        return device
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
    return DeviceNDArray(device.shape, canonical, device.dtype, gpu_data=device.gpu_data)


_COMPILE_CHECK: list = []   # [None] once a kernel compiled and ran, [message] when it failed


def _check_compile_and_launch() -> None:
    """Compile and launch one tiny kernel once per process; NotImplementedError with the fix if it fails.

    Importing numba-cuda and finding a GPU does not prove that kernels compile:
    numba-cuda 0.30.4 fails at the first compile under NumPy 2.5 (``module
    'numpy' has no attribute 'row_stack'``), and a probe that skips this
    reports the backend available while every call fails.
    """
    if not _COMPILE_CHECK:
        try:
            from lstmeng.backends import _cuda_elementwise as ew
            probe = cuda.device_array(1, dtype=np.float32)
            ew.fill_1d[1, 1](probe, 1.0)
            if float(probe.copy_to_host()[0]) != 1.0:
                raise RuntimeError("a one-element fill kernel wrote the wrong value")
            _COMPILE_CHECK.append(None)
        except Exception as error:
            _COMPILE_CHECK.append(_compile_failure_message(error))
    if _COMPILE_CHECK[0] is not None:
        raise NotImplementedError(_COMPILE_CHECK[0])


def _compile_failure_message(error) -> str:
    """What went wrong at the first kernel compile, with the fix when it is a known incompatibility."""
    text = f"{type(error).__name__}: {str(error).strip()}"
    message = f"numba-cuda {_numba_cuda_version()} cannot compile and launch a kernel here ({text})"
    if "row_stack" in text or ("numpy" in text and "has no attribute" in text):
        message += (f"; numba-cuda {_numba_cuda_version()} needs numpy<2.5 (this is NumPy {np.__version__}): "
                    "pip install 'numpy<2.5'")
    return message


def _last_axis_slice(array, start, stop):
    """``array[..., start:stop]`` as a device view (numba device arrays take no Ellipsis)."""
    if len(array.shape) == 1:
        return array[start:stop]
    if len(array.shape) == 2:
        return array[:, start:stop]
    return array[:, :, start:stop]


# -- the simulator's arrays -----------------------------------------------------------
_SIMULATED_CLASS = None


def _fake_array_class():
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
    return FakeCUDAArray


def _simulated(array):
    """Under the simulator: ``array`` as a simulator array that carries ``__cuda_array_interface__``.

    numba's simulator arrays wrap a host ndarray and have no CUDA array
    interface, so lstmeng's registry would take them for host arrays. This
    subclass adds the interface (pointing at the host buffer, which is what
    the simulator's "device" memory is) so the layers route them exactly as
    they route real device arrays. It is never used on a GPU.
    """
    global _SIMULATED_CLASS
    fake = _fake_array_class()
    if _SIMULATED_CLASS is None:
        class SimulatedDeviceArray(fake):
            @property
            def __cuda_array_interface__(self):
                interface = dict(self._ary.__array_interface__)
                interface["version"] = 3
                interface.setdefault("strides", None)
                interface["stream"] = None
                return interface

            def __getitem__(self, index):
                item = super().__getitem__(index)
                return _simulated(item) if isinstance(item, fake) else item

            def reshape(self, *args, **kwargs):
                return _simulated(super().reshape(*args, **kwargs))

        _SIMULATED_CLASS = SimulatedDeviceArray
    if isinstance(array, _SIMULATED_CLASS):
        return array
    if isinstance(array, fake):
        return _SIMULATED_CLASS(array._ary, stream=array.stream)
    if isinstance(array, np.ndarray):
        raise TypeError("numba_cuda (simulator): expected a device array, got a host ndarray")
    interface = getattr(array, "__cuda_array_interface__", None)
    if interface is not None:
        # A foreign CUDA array (a test's stand-in for CuPy or torch): the simulator's
        # "device" memory is host memory, so its pointer is read in place, as on a GPU.
        return _SIMULATED_CLASS(np.asarray(_HostView(interface, array)))
    raise TypeError(f"numba_cuda: {type(array).__name__} is not a CUDA array the simulator can use")


class _HostView:
    """Presents a CUDA array interface as NumPy's array interface (simulator only); keeps its owner alive."""

    def __init__(self, interface, owner):
        self._owner = owner
        self.__array_interface__ = {"shape": tuple(interface["shape"]), "typestr": interface["typestr"],
                                    "data": tuple(interface["data"]), "strides": interface.get("strides"),
                                    "version": 3}


backend = NumbaCudaBackend()
