"""``rpcfast-perf demo``: the main job a newcomer runs (``make run``).

Starts an echo server in a subprocess on UDP and ZeroMQ, calls it, and prints a short latency
report against the raw Python UDP busy-poll baseline measured in the same run, plus the time-trace
breakdown of one UDP null RPC. Takes about half a minute.
"""

from __future__ import annotations

import argparse

from perf import _stats
from perf._stats import Column, Row

HELP = "Serve the echo service, call it, and print a short latency report (the main job)."

_SYSTEMS = ("rpcfast-udp", "rpcfast-zmq", "raw-udp-poll")
_PAYLOADS = (0, 100, 1000, 65536)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--iterations", type=int, default=3000, help="round trips per measurement")
    parser.add_argument("--seconds", type=float, default=1.5, help="time bound per measurement")


def run(args: argparse.Namespace) -> int:
    from perf import _rpcfast_bench
    from perf._peers import measure_peer, supports
    from perf.rpc import add_ratios

    rows: list[Row] = []
    for payload in _PAYLOADS:
        for system in _SYSTEMS:
            if not system.startswith("rpcfast-") and not supports(system, payload):
                continue
            try:
                if system.startswith("rpcfast-"):
                    samples = _rpcfast_bench.measure(system, payload, args.iterations, args.seconds)
                else:
                    samples = measure_peer(system, payload, args.iterations, args.seconds)
                rows.append(_stats.latency_row(system, payload, samples))
            except Exception as exc:
                rows.append(_stats.error_row(system, payload, exc))
            print(f"  measured {system} payload={payload}", flush=True)
    add_ratios(rows, "raw-udp-poll")
    columns = (
        Column("payload", "payload"),
        Column("system", "system"),
        Column("median_us", "median_us", "{:.1f}"),
        Column("p99_us", "p99_us", "{:.1f}"),
        Column("ratio", "x raw", "{:.2f}"),
        Column("error", "error"),
    )
    print("\nEcho round trips (server in another process, loopback):")
    print(_stats.format_table(rows, columns))
    print("\nWhere a UDP null RPC's time goes (medians of traced calls):")
    print(_rpcfast_bench.breakdown("rpcfast-udp", 0, args.iterations, args.seconds))
    failed = [r for r in rows if "error" in r and str(r["system"]).startswith("rpcfast")]
    return 1 if failed else 0
