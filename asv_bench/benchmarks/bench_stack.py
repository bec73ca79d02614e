"""A two-layer bidirectional stack, the common sequence-encoder architecture."""

import numpy as np

import lstmeng as le

from .common import BACKENDS, SHAPES, Benchmark, host_inputs, require_backend, synchronizer, to_backend

#: The wide shape is left out: a bidirectional 2-layer stack at H=512 would
#: dominate the whole suite's run time without telling more than LayerForward.
STACK_SHAPES = ("latency-B1", "mid-B64", "varlen-B64")


class BidirectionalStack(Benchmark):
    """``Sequential([Bidirectional(LSTM(H)), Bidirectional(LSTM(H))])`` returning ``[B, T, 2H]``.

    Only the training step is timed: it runs the stack's forward too, and
    each extra benchmark costs a process per backend and shape in every run.
    """

    params = (BACKENDS, STACK_SHAPES)
    param_names = ("backend", "shape")

    def setup(self, backend, shape_name):
        require_backend(backend)
        shape = SHAPES[shape_name]
        x, self.lengths, dy = host_inputs(shape)
        self.model = le.Sequential([
            le.Bidirectional(le.LSTM(shape.units, return_sequences=True, backend=backend, seed=0)),
            le.Bidirectional(le.LSTM(shape.units, return_sequences=True, backend=backend, seed=1)),
        ])
        self.model.build(shape.inputs)
        self.x = to_backend(backend, x)
        # The stack's output has 2H features (forward and backward directions concatenated).
        self.dy = to_backend(backend, np.concatenate([dy, dy[:, ::-1]], axis=-1))
        self.synchronize = synchronizer(backend)
        self.time_stack_training_step(backend, shape_name)

    def time_stack_training_step(self, backend, shape):
        self.model(self.x, lengths=self.lengths, training=True)
        self.model.backward(self.dy)
        self.synchronize()
