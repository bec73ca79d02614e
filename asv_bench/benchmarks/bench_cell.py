"""``le.LSTMCell``: one time step, the unit of work of decoders and custom loops."""

import lstmeng as le

from .common import BACKENDS, SHAPE_NAMES, SHAPES, Benchmark, host_inputs, require_backend, synchronizer, to_backend


class CellStep(Benchmark):
    """One step of ``[B, I]`` inputs and ``[B, H]`` states (the shape's B, I, H); and a training
    unroll of the shape's T steps, forward then backward newest first (its weight gradients are
    formed at once on the cython backend's one-step kernel, see ``lstmeng.cell``)."""

    params = (BACKENDS, SHAPE_NAMES)
    param_names = ("backend", "shape")

    def setup(self, backend, shape_name):
        require_backend(backend)
        shape = SHAPES[shape_name]
        x, _, dy = host_inputs(shape)
        self.cell = le.LSTMCell(shape.units, backend=backend, seed=0)
        self.cell.build(shape.inputs)
        self.x_t = to_backend(backend, x[:, 0, :].copy())
        self.states = [to_backend(backend, dy[:, 0, :].copy()), to_backend(backend, dy[:, 1, :].copy())]
        self.synchronize = synchronizer(backend)
        self.steps = shape.steps
        self.dh = self.states[0]
        # Warm-up, the unroll first: asv times the calls right after setup, so its last call
        # is what the timed one finds in the caches. A step after a step, as in a decoder loop;
        # after the unroll (whose weight-gradient product now comes last at small batches),
        # the first step at large-H512 read 0.6-0.9 ms against 0.3 for the next ones.
        self.time_training_unroll(backend, shape_name)
        self.time_cell_step(backend, shape_name)

    def time_cell_step(self, backend, shape):
        self.cell(self.x_t, states=self.states)
        self.synchronize()

    def time_training_unroll(self, backend, shape):
        states = self.states
        for _ in range(self.steps):
            _, states = self.cell(self.x_t, states, training=True)
        dh, dc = self.dh, None
        for _ in range(self.steps):
            _, (dh, dc) = self.cell.backward(dh, dc)
        self.cell.grads["kernel"]   # the round's gradients formed (where they wait for a read)
        self.synchronize()
