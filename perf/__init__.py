"""Benchmarks for rpcfast, run through the ``rpcfast-perf`` command.

Timed measurements live here and never in the test suite: absolute times on a shared machine
drift between runs, so every comparison runs the peers side by side in one run and reports
ratios against a common baseline (see ``perf.rpc``).
"""

__all__: list[str] = []
