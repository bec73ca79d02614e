"""Test-session settings shared by every test module.

The CUDA simulator must be switched on before numba is first imported, so it
is set here, at collection time. On a machine with a real GPU, run with
LSTMENG_REAL_CUDA=1 to test the numba_cuda kernels on the device instead.
"""

import os

if os.environ.get("LSTMENG_REAL_CUDA") != "1":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    try:
        from _simulator_fixes import lock_shared_array_allocation
        lock_shared_array_allocation()   # the simulator's shared-array race (tests/_simulator_fixes.py)
    except ImportError:   # numba or numba-cuda not installed: no simulator to fix
        pass
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
