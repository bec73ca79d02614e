"""Process-level facilities the library and the CLI share: thread pools and CPU facts
(``threads``) and the timers, peaks and problem shapes of the benchmarks (``timing``).

Nothing here knows about layers or backends; everything above may import it.
"""
