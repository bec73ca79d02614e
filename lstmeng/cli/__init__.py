"""The ``lstmeng`` command (``info``, ``demo``, ``bench``): an application of the library.

Data flows one way: this subpackage imports the library (layers, backends,
``lstmeng._runtime``), and nothing in the library imports it.

Modules:
    commands: the argument parser and ``main``, the entry point (``lstmeng = "lstmeng.cli:main"``).
    info:  ``lstmeng info``: what this machine offers lstmeng (it only reports).
    demo:  ``lstmeng demo``: trains a small model end to end with public pieces.
    bench: ``lstmeng bench``: backends timed against each other and PyTorch/Keras.
"""

from lstmeng.cli.commands import main

__all__ = ["main"]
