"""Padding and masks: from a list of sequences to ``x: [B, T, I]`` and ``mask: [B, T]``.

``pad_batch(sequences)`` returns ``(x, mask)`` for feature sequences (padding at
the end); ``pad_sequences`` is Keras's function under Keras's name (padding
and truncating at the front, int32, the array only).

A mask is bool ``[B, T]`` with True at real steps. ``lengths: [B]`` describes a
right-padded batch and means ``arange(T) < lengths[:, None]``::

    lengths_to_mask([2, 0, 3], maxlen=3) ->
        [[ True,  True, False],
         [False, False, False],
         [ True,  True,  True]]
"""

from __future__ import annotations

import numpy as np

from lstmeng import _validation


def lengths_to_mask(lengths, maxlen=None) -> np.ndarray:
    """Bool mask ``[B, maxlen]`` that is True for the first ``lengths[b]`` steps of row b.

    Example:
        >>> import lstmeng as le
        >>> le.lengths_to_mask([1, 3]).astype(int).tolist()
        [[1, 0, 0], [1, 1, 1]]
    """
    lengths = np.asarray(lengths)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be 1-D (batch,), got shape {lengths.shape}")
    if lengths.size and (lengths.dtype == bool or not np.issubdtype(lengths.dtype, np.number)
                         or np.issubdtype(lengths.dtype, np.complexfloating)):
        raise TypeError(f"lengths must be integers, got dtype {lengths.dtype}")
    if lengths.size and not np.issubdtype(lengths.dtype, np.integer):
        if not np.all(np.equal(np.mod(lengths, 1), 0)):
            raise ValueError(f"lengths must be integers, got {lengths.dtype} values {lengths.tolist()[:5]}")
        lengths = lengths.astype(np.int64)
    if lengths.size and lengths.min() < 0:
        raise ValueError(f"lengths must be >= 0, got {int(lengths.min())}")
    if maxlen is None:
        maxlen = int(lengths.max()) if lengths.size else 0
    elif lengths.size and lengths.max() > maxlen:
        raise ValueError(f"lengths must be <= time steps ({maxlen}), got {int(lengths.max())}")
    return np.arange(maxlen)[None, :] < lengths[:, None]


def resolve_mask(mask, lengths, batch: int, steps: int):
    """The one mask a layer uses: ``[B, T]`` bool, or None when every step is real.

    ``mask`` may be a host array or a device array (it is passed through after
    its shape and dtype are checked); ``lengths`` is converted on the host.
    """
    if mask is not None and lengths is not None:
        raise ValueError("give mask or lengths, not both")
    if lengths is not None:
        lengths = np.asarray(lengths)
        if lengths.shape != (batch,):
            raise ValueError(f"lengths must have shape ({batch},), got {lengths.shape}")
        return lengths_to_mask(lengths, maxlen=steps)
    if mask is None:
        return None
    if not hasattr(mask, "shape") or not hasattr(mask, "dtype"):
        mask = np.asarray(mask)
    if getattr(mask.dtype, "name", str(mask.dtype)) != "bool":
        raise TypeError(f"mask must be boolean (True = real step), got dtype {mask.dtype}")
    _validation.check_shape(mask, "mask", (batch, steps))
    return mask


def pad_batch(sequences, maxlen=None, dtype="float32", padding="post", truncating="post", value=0.0):
    """Stack variable-length sequences of feature vectors into ``x: [B, T, F]`` and ``mask: [B, T]``.

    (This was ``pad_sequences`` before that name took Keras's semantics.)

    Args:
        sequences: list of arrays ``[t_b, F]`` (or ``[t_b]`` for scalars per step: F = 1).
        maxlen: T; defaults to the longest sequence.
        padding: "post" pads at the end, "pre" at the start.
        truncating: "post" drops steps at the end, "pre" at the start.
        value: fill value of padded steps.

    Returns:
        (x, mask)

    Example:
        >>> import numpy as np, lstmeng as le
        >>> x, mask = le.pad_batch([np.ones((2, 3)), np.ones((1, 3))])
        >>> x.shape, mask.tolist()
        ((2, 2, 3), [[True, True], [True, False]])
    """
    _validation.check_choice(padding, "padding", ("post", "pre"))
    _validation.check_choice(truncating, "truncating", ("post", "pre"))
    arrays = []
    for index, array in enumerate(_numeric_sequences(sequences)):
        if array.ndim == 1:
            array = array[:, None]
        if array.ndim != 2:
            raise ValueError(f"sequences[{index}] must be (time,) or (time, features), got shape {array.shape}")
        arrays.append(array)
    return _pad(arrays, maxlen, dtype, padding, truncating, value, empty_sample=(1,))


def pad_sequences(sequences, maxlen=None, dtype="int32", padding="pre", truncating="pre", value=0.0):
    """Keras's ``pad_sequences``: a list of sequences as one array ``[B, T, ...]``, padded and truncated.

    Same arguments, defaults and result as ``keras.utils.pad_sequences``: the
    padding and the truncation are at the *front* ("pre") unless asked
    otherwise, the result is int32 unless ``dtype`` says otherwise (token ids),
    and only the array is returned. For a mask, use ``padding="post"`` with an
    ``Embedding(mask_zero=True)`` (id 0 = padding), or ``pad_batch``, which
    returns ``(x, mask)`` for feature sequences. Note that lstmeng's recurrent
    layers, like Keras's, treat the mask the same wherever the padding is.

    Args:
        sequences: list of sequences, each a list or array ``[t_b, ...]``.
        maxlen: T; defaults to the longest sequence.
        dtype: of the result ("int32"; a float dtype for feature sequences).
        padding: "pre" (default) or "post".
        truncating: "pre" (default: keep the end) or "post".
        value: fill value.

    Returns:
        np.ndarray ``[B, T]`` (``[B, T, ...]`` for sequences of vectors).

    Example:
        >>> import lstmeng as le
        >>> le.pad_sequences([[1, 2, 3], [4]]).tolist()
        [[1, 2, 3], [0, 0, 4]]
        >>> le.pad_sequences([[1, 2, 3], [4]], maxlen=2, padding="post").tolist()
        [[2, 3], [4, 0]]
    """
    _validation.check_choice(padding, "padding", ("post", "pre"))
    _validation.check_choice(truncating, "truncating", ("post", "pre"))
    arrays = list(_numeric_sequences(sequences))
    for index, array in enumerate(arrays):
        if array.ndim == 0:
            raise ValueError(f"sequences[{index}] must be a sequence (a list or an array of rank >= 1), "
                             f"got the scalar {array.item()!r}")
    return _pad(arrays, maxlen, dtype, padding, truncating, value, empty_sample=())[0]


def _numeric_sequences(sequences):
    """Each sequence as a NumPy array, checked numeric."""
    if isinstance(sequences, np.ndarray) and sequences.ndim >= 2 and sequences.dtype != object:
        sequences = list(sequences)
    if not isinstance(sequences, (list, tuple)):
        raise TypeError(f"sequences must be a list of arrays, got {type(sequences).__name__}")
    for index, sequence in enumerate(sequences):
        array = np.asarray(sequence)
        if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
            raise TypeError(f"sequences[{index}] must be numeric, got dtype {array.dtype}")
        yield array


def _pad(arrays, maxlen, dtype, padding, truncating, value, empty_sample):
    """The padding both functions share: ``x [B, T, *sample]`` and ``mask [B, T]``
    (``empty_sample`` is the sample shape of an empty list)."""
    dtype = np.dtype(dtype)
    samples = {a.shape[1:] for a in arrays if a.shape[0] > 0} or {a.shape[1:] for a in arrays} or {empty_sample}
    if len(samples) > 1:
        raise ValueError(f"every sequence must have the same number of features, got "
                         f"{sorted(shape[0] if len(shape) == 1 else shape for shape in samples)}")
    sample_shape = samples.pop()
    if maxlen is None:
        maxlen = max((a.shape[0] for a in arrays), default=0)
    elif isinstance(maxlen, bool) or int(maxlen) != maxlen or maxlen < 0:
        raise ValueError(f"maxlen must be a non-negative integer or None, got {maxlen!r}")
    maxlen = int(maxlen)
    x = np.full((len(arrays), maxlen) + sample_shape, value, dtype=dtype)
    mask = np.zeros((len(arrays), maxlen), dtype=bool)
    for row, array in enumerate(arrays):
        kept = array[:maxlen] if truncating == "post" else array[max(0, array.shape[0] - maxlen):]
        if kept.shape[0] == 0:
            continue
        if padding == "post":
            x[row, :kept.shape[0]] = kept
            mask[row, :kept.shape[0]] = True
        else:
            x[row, maxlen - kept.shape[0]:] = kept
            mask[row, maxlen - kept.shape[0]:] = True
    return x, mask
