"""Kernel overrides: force one internal code path of a backend, for tests and benchmarks only.

The backends choose their internal paths themselves (how a small batch is
split among threads, which instruction set runs, where a GPU recurrence keeps
its weights, ...). Tests need to run every path at small sizes, and
benchmarks need to time one against another; they force a path here instead
of through switches on the production classes, so that ``CythonBackend()``
and ``NumbaCudaBackend()`` have no testing parameters and the forcing is
visible at one place. Users never need this: every field's automatic choice
(``None``) is the production behaviour.

    >>> from lstmeng.testing import kernel_overrides
    >>> with kernel_overrides(cython_split_units=False):
    ...     pass   # cython calls in this block never split a batch's units

Scope: the overrides live in a ``contextvars.ContextVar``, so a block affects
the calls made on its own thread (or asyncio task) only, blocks nest, and the
previous overrides come back on exit, also on an exception. A thread started
inside a block does not inherit them (``threading.Thread`` starts with an
empty context): enter the block in that thread. Exception: ``cython_isa`` and
``cython_fast_gate_math`` select compiled kernels through process-wide C
switches, which the cython backend sets at the start of each call from the
caller's overrides: do not run cython calls on other threads while a block
sets them, nor change them between a training forward and its backward.

The backends read the overrides at call time (``current()``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator


@dataclasses.dataclass(frozen=True)
class KernelOverrides:
    """Internal paths forced for tests and benchmarks; None everywhere = the automatic choice.

    Attributes:
        cython_split_units: True splits the units of every batch too small to
            split by rows among the threads (any layer size); False never
            does; None splits layers of at least ``MIN_UNITS_TO_SPLIT`` units
            and backs off while the split is losing on a busy machine.
        cython_packed_variable_length: False sends right-padded masks down the
            general masked path instead of the sorted, shrinking-batch one
            (the same numbers); None (or True) takes the packed path.
        cython_one_step: False sends one-step calls down the general path
            instead of the extension's ``step_forward`` (the same numbers), and
            their ``sequence_backward_gates`` gives weight gradients, not dz;
            None (or True) takes it where it applies (``CythonBackend._one_step``).
        cython_isa: "avx512", "avx2" or "scalar": the hand-written kernel
            family (one of ``_cython_lstm.SUPPORTED_ISAS``); None the CPU's best.
        cython_fast_gate_math: False runs the generic row code instead of the
            fused gate kernels (float32, tanh / sigmoid); None (or True) uses
            them where the CPU has them.
        cython_pipeline: False keeps a one-part call without a unit split
            in its unpipelined order: the forward projects each chunk of steps
            on the loop's thread before its steps, the backward computes its
            weight gradients and dx after its time loop (shared by the
            threads), instead of on another thread while the loop runs (the
            same numbers); None (or True) pipelines where the extension can.
        cuda_recurrence_design: "small" (an error where it does not apply) or
            "general" forces one numba_cuda recurrence design; None chooses
            per call.
        cuda_weights_in_shared: False keeps the numba_cuda recurrence's weights
            in global memory / L2 (the fallback of sizes that do not fit);
            None (or True) copies them into shared memory when they fit.
        cuda_gemm_path: "numba", "cublas" or "auto": the numba_cuda GEMM path,
            over ``LSTMENG_CUDA_GEMM`` (the user-facing switch); None reads
            that variable.
    """

    cython_split_units: bool | None = None
    cython_packed_variable_length: bool | None = None
    cython_one_step: bool | None = None
    cython_isa: str | None = None
    cython_fast_gate_math: bool | None = None
    cython_pipeline: bool | None = None
    cuda_recurrence_design: str | None = None
    cuda_weights_in_shared: bool | None = None
    cuda_gemm_path: str | None = None

    def __post_init__(self):
        choices = {"cython_isa": ("avx512", "avx2", "scalar"), "cuda_recurrence_design": ("small", "general"),
                   "cuda_gemm_path": ("auto", "numba", "cublas")}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            allowed = choices.get(field.name, (True, False))
            # bool only where a flag is meant (1 == True would pass a plain `in`).
            if value is not None and not (value in allowed and type(value) is type(allowed[0])):
                raise ValueError(f"kernel override {field.name} must be None or one of {allowed}, got {value!r}")


_NONE = KernelOverrides()
_current: contextvars.ContextVar[KernelOverrides] = contextvars.ContextVar("lstmeng_kernel_overrides",
                                                                           default=_NONE)


def current() -> KernelOverrides:
    """The overrides in force for this thread / task (all None outside any block)."""
    return _current.get()


@contextlib.contextmanager
def kernel_overrides(**fields) -> Iterator[KernelOverrides]:
    """Force internal kernel paths within the block; for tests and benchmarks only.

    Args:
        **fields: ``KernelOverrides`` fields to set; the others keep the
            enclosing block's values (None outside any block). Passing None
            restores a field's automatic choice inside the block.

    Returns:
        A context manager yielding the ``KernelOverrides`` in force; the
        previous ones are restored on exit. Raises TypeError for an unknown
        field and ValueError for a value the field does not take, before
        anything changes.

    Example:
        >>> from lstmeng.testing import kernel_overrides
        >>> with kernel_overrides(cython_split_units=True) as overrides:
        ...     overrides.cython_split_units
        True
    """
    overrides = dataclasses.replace(_current.get(), **fields)
    token = _current.set(overrides)
    try:
        yield overrides
    finally:
        _current.reset(token)
