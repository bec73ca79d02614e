"""The conformance suite at realistic sizes, on the host backends, in every CI run.

The suite's default cases are tiny (B5 T7 I4 H6). A case that is
ill-conditioned only at real sizes (an expansive recurrence with an unbounded
activation, whose outputs and gradients grow to 1e7-1e20 over 56 steps) once
hid behind them and made correct backends fail on a GPU. These tests hold
every case to the suite's tight tolerances at ``size=8`` (B40 T56 I32 H48)
on the CPU backends, and bound the reference's magnitudes at sizes 1 to 8,
so such a case cannot come back unnoticed.

Runtime: about 5 s for cython, 35 s for tensorflow (each case traces its own
tf.functions), 5 s for the magnitude check, on 2 CPU cores.
"""

from __future__ import annotations

import numpy as np
import pytest

from lstmeng import testing
from lstmeng.backends import registry

from _backends import backends

REALISTIC_SIZE = 8
REALISTIC_CASES = testing.conformance_cases(size=REALISTIC_SIZE)

#: Largest |value| a well-conditioned case may produce in any output, state or
#: gradient. Well-conditioned cases stay below ~100 at size 8 (the weight
#: gradients sum over B*T terms); the expansive ones this guards against went
#: to 1e6 and beyond.
MAGNITUDE_LIMIT = 1e3


@pytest.mark.parametrize("backend_name", backends(only=("cython", "tensorflow")))
def test_realistic_size_conformance(backend_name):
    """Every size-8 case (both dtypes) matches the NumPy reference; all failures are reported together."""
    failures = []
    for case in REALISTIC_CASES:
        try:
            testing.check_case(backend_name, case)
        except AssertionError as error:
            failures.append(f"{case}: {str(error).strip().splitlines()[0]}")
    assert not failures, f"{len(failures)} of {len(REALISTIC_CASES)} cases failed:\n" + "\n".join(failures)


@pytest.mark.parametrize("size", [1, 3, REALISTIC_SIZE])
def test_cases_are_well_conditioned(size):
    """The reference's outputs, states and gradients stay O(1-100) for every case at every size.

    Checked in float64 on the NumPy reference, so rounding plays no part: a
    large value here means the case itself amplifies, which would make the
    tolerances either meaningless or unmeetable for a correct backend.
    """
    reference = registry.get_backend_object("numpy")
    too_large = []
    for case in testing.conformance_cases(dtypes=("float64",), size=size):
        results = testing.run_backend(reference, case, testing.make_inputs(case), training=True)
        largest = max(float(np.abs(value).max(initial=0.0)) for value in results.values())
        if not np.isfinite(largest) or largest > MAGNITUDE_LIMIT:
            too_large.append(f"{case}: max |value| {largest:.3g}")
    assert not too_large, "ill-conditioned cases:\n" + "\n".join(too_large)
