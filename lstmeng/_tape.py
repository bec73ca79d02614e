"""The training tape and its debug guard.

``TrainingTape``: what training calls left for ``backward``, consumed
last-in-first-out (every layer keeps one). ``InputGuard``: under
``LSTMENG_DEBUG=1``, a checksum of the ``x`` a workspace references, checked at
the backward (PyTorch's version counter, done by content).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
import zlib

import numpy as np

from lstmeng.backends import registry

DEBUG_ENV = "LSTMENG_DEBUG"
#: A round that keeps more workspace memory than this without a backward warns (as at
#: ``TrainingTape``'s call count): at (B, T, I, H) = (64, 100, 256, 256) a training call keeps
#: ~39 MB, so 256 calls were 10 GB before the count warned; the process slowed 5x from the tenth
#: call on (fresh pages for every workspace) and could run out of memory first.
WARN_AFTER_BYTES = 2**30
#: Workspace fields that reference the caller's arrays (kept alive, not made, by the workspace).
_REFERENCED_FIELDS = frozenset({"x", "kernel", "recurrent_kernel", "bias", "options"})


def workspace_bytes(workspace) -> int:
    """The bytes of the arrays a backend's workspace made for its backward (those with ``nbytes``:
    NumPy and numba-cuda arrays; TensorFlow tensors count nothing), not those it references (x,
    the weights). 0 for None or a workspace that is no dataclass."""
    if workspace is None or not dataclasses.is_dataclass(workspace):
        return 0
    return sum(int(getattr(getattr(workspace, name), "nbytes", 0) or 0) for name in _owned_fields(type(workspace)))


@functools.lru_cache(maxsize=None)
def _owned_fields(workspace_type) -> tuple:
    """The names of a workspace class's fields that ``workspace_bytes`` counts (``dataclasses.fields``
    takes ~1 us a call)."""
    return tuple(field.name for field in dataclasses.fields(workspace_type) if field.name not in _REFERENCED_FIELDS)


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

    def __init__(self, warn_after: int = 256, warn_after_bytes: int | None = None):
        self._entries: list = []
        self._backward_ran = False   # a backward consumed an entry of the current round
        # Training calls never backpropagated keep their workspaces alive (training=True used for
        # inference, e.g. Monte Carlo dropout): say so once, when a round grows this long or keeps
        # this many bytes.
        self._warn_after = warn_after
        self._warn_after_bytes = WARN_AFTER_BYTES if warn_after_bytes is None else warn_after_bytes
        self._round_bytes = 0
        self._first_size = None   # the round's first call's size function, measured at its second
        self._warned = False

    def push(self, entry, size=None) -> bool:
        """Record a training call (``size``: a function returning what its entry keeps in memory,
        ``workspace_bytes``, or None); returns True when it starts a new round. The sizes are
        measured only once a round has a second call (~1-2 us each: a training call followed by
        its backward, the usual loop, pays nothing)."""
        if self._backward_ran:
            self._entries.clear()   # a new round over leftovers of a truncated one: start clean
            self._backward_ran = False
        new_round = not self._entries
        self._entries.append(entry)
        if new_round:
            self._round_bytes, self._first_size = 0, size
        else:
            if self._first_size is not None:
                self._round_bytes += self._first_size()
                self._first_size = None
            if size is not None:
                self._round_bytes += size()
        if (len(self._entries) > self._warn_after or self._round_bytes > self._warn_after_bytes) and not self._warned:
            self._warned = True
            warnings.warn(f"{len(self._entries)} training calls are recorded ({self._round_bytes / 2**20:.0f} MiB "
                          "of workspaces) and none was backpropagated: their workspaces stay in memory until "
                          "backward() or reset_tape(); call with training=False where no backward follows",
                          ResourceWarning, stacklevel=4)
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
        self._first_size = None   # (its function holds the round's first workspace)
        return entry, accumulate

    def undo_pop(self, entry, accumulate: bool) -> None:
        """Put back an entry popped by a backward that then failed elsewhere (nothing half-consumed)."""
        self._entries.append(entry)
        self._backward_ran = accumulate

    def drop_last(self) -> None:
        """Forget the entry just pushed (a call that failed after pushing it)."""
        if self._entries:
            self._entries.pop()
        if not self._entries:
            self._first_size = None

    @property
    def last(self):
        return self._entries[-1] if self._entries else None

    def clear(self) -> None:
        self._entries.clear()
        self._backward_ran = False
        self._first_size = None

    def __len__(self) -> int:
        return len(self._entries)
