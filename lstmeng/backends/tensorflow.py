"""Placeholder until the tensorflow backend lands: it reports itself unavailable."""

from lstmeng.backends.base import Backend


class _Pending(Backend):
    name = "tensorflow"

    def probe(self):
        raise NotImplementedError("the tensorflow backend is not part of this build yet")

    def sequence_forward(self, *args, **kwargs):
        raise NotImplementedError

    def sequence_backward(self, *args, **kwargs):
        raise NotImplementedError


backend = _Pending()
