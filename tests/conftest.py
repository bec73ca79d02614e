"""Test-session settings shared by every test module.

The CUDA simulator must be switched on before numba is first imported, so it
is set here, at collection time. On a machine with a real GPU, run with
LSTMENG_REAL_CUDA=1 to test the numba_cuda kernels on the device instead.
"""

import os

if os.environ.get("LSTMENG_REAL_CUDA") != "1":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
