"""What layers made of layers share: all-or-nothing ``set_weights`` and ``to(device)``.

``Bidirectional`` (two directions) and ``Sequential`` (its layers) each change
several layers in one call; when one of them fails, the ones already changed
are put back, so nothing is left half-updated.
"""

from __future__ import annotations


def _set_weights_all_or_nothing(assignments) -> None:
    """``layer.set_weights(weights)`` for each ``(layer, weights)`` in turn, as one transaction.

    Every layer's own ``set_weights`` checks all its arrays before it assigns any (a failed call
    changes nothing). When one raises here, the layers already set get back what they had (their
    weights, or unbuilt if they had none) and the error propagates: nothing is left half-updated.
    Used by ``Bidirectional`` (its two directions) and ``Sequential`` (its layers).
    """
    done = []
    try:
        for layer, weights in assignments:
            saved = layer.get_weights()
            layer.set_weights(weights)
            done.append((layer, saved))
    except Exception:
        for layer, saved in reversed(done):
            _restore_weights(layer, saved)
        raise


def _restore_weights(layer, saved: list) -> None:
    """Give ``layer`` back the weights ``saved`` (from its ``get_weights``); [] makes it unbuilt again."""
    if saved:
        layer.set_weights(saved)
    elif hasattr(layer, "forward_layer"):   # Bidirectional: both directions
        for direction in (layer.forward_layer, layer.backward_layer):
            _restore_weights(direction, [])
    elif hasattr(layer, "_params"):          # a layer with weights (Dropout has none)
        layer._params = {}
        if hasattr(layer, "input_size"):
            layer.input_size = None


def _move_all(layers, device) -> None:
    """``layer.to(device)`` for each layer; on an error the layers already moved go back."""
    moved = []
    try:
        for layer in layers:
            previous = layer.device
            layer.to(device)
            moved.append((layer, previous))
    except Exception:
        for layer, previous in reversed(moved):
            layer.to(previous)
        raise
