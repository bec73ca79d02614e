"""Placeholder until the numba_cuda backend lands: it reports itself unavailable."""

from lstmeng.backends.base import Backend


class _Pending(Backend):
    name = "numba_cuda"

    def probe(self):
        raise NotImplementedError("the numba_cuda backend is not part of this build yet")

    def sequence_forward(self, *args, **kwargs):
        raise NotImplementedError

    def sequence_backward(self, *args, **kwargs):
        raise NotImplementedError


backend = _Pending()
