"""``rpcfast-perf rpc``: RPC round trips of rpcfast's transports and of the peers, side by side.

For each payload the rpcfast systems run first, then the peers, all in one run on one machine,
and every median is also given as a ratio to the ``raw-udp-poll`` median for the same payload:
absolute times on a shared machine drift between runs, ratios much less. A system that fails
(cannot import, crashes, times out) becomes an error row and the run goes on.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

from attrs import frozen

from perf import _args, _stats
from perf._stats import Column, Row

HELP = "Round-trip latency of rpcfast transports and of peer RPC systems, side by side."

DEFAULT_PAYLOADS: tuple[int, ...] = (0, 100, 1000, 65536, 1048576)
DEFAULT_ITERATIONS = 20000
DEFAULT_SECONDS = 2.0
QUICK_ITERATIONS = 300
QUICK_SECONDS = 0.25
RPCFAST_MODULE = "perf._rpcfast_bench"
RPCFAST_DEFAULT_SYSTEMS: tuple[str, ...] = ("rpcfast-udp", "rpcfast-zmq", "rpcfast-inproc")
THROUGHPUT_PAYLOAD = 100
THROUGHPUT_OUTSTANDING = 32

Measure = Callable[[str, int, int, float], list[float]]
Throughput = Callable[[str, int, int, float], float]

LATENCY_COLUMNS = (
    Column("payload", "payload"),
    Column("system", "system"),
    Column("median_us", "median_us", "{:.1f}"),
    Column("p99_us", "p99_us", "{:.1f}"),
    Column("mean_us", "mean_us", "{:.1f}"),
    Column("min_us", "min_us", "{:.1f}"),
    Column("count", "count"),
    Column("ratio", "ratio", "{:.2f}"),
)
THROUGHPUT_COLUMNS = (
    Column("system", "system"),
    Column("payload", "payload"),
    Column("outstanding", "outstanding"),
    Column("ops_per_s", "ops_per_s", "{:.0f}"),
)


@frozen
class RpcfastBackend:
    """The lead's rpcfast measurements, or why they could not be loaded."""

    systems: tuple[str, ...]
    measure: Measure | None
    throughput: Throughput | None
    error: str | None

    @classmethod
    def load(cls, module_name: str = RPCFAST_MODULE) -> RpcfastBackend:
        try:
            module: ModuleType = importlib.import_module(module_name)
            systems = tuple(module.RPCFAST_SYSTEMS)
            measure: Measure = module.measure
        except Exception as exc:
            return cls(RPCFAST_DEFAULT_SYSTEMS, None, None, f"{type(exc).__name__}: {exc}")
        throughput: Throughput | None = getattr(module, "throughput", None)
        return cls(systems, measure, throughput, None)


@frozen
class Config:
    """One run of the ``rpc`` benchmark."""

    payloads: tuple[int, ...]
    systems: tuple[str, ...]
    iterations: int
    seconds: float


def all_systems(backend: RpcfastBackend) -> tuple[str, ...]:
    """Every system in run order: rpcfast's first, then the peers."""
    from perf._peers import PEER_SYSTEMS

    return backend.systems + PEER_SYSTEMS


def add_ratios(rows: list[Row], baseline: str) -> None:
    """Set each latency row's ``ratio`` to its median over the baseline's median (same payload)."""
    base: dict[object, float] = {}
    for row in rows:
        median = row.get("median_us")
        if row["system"] == baseline and row.get("op") == "latency" and median is not None:
            base[row["payload"]] = float(median)
    for row in rows:
        median = row.get("median_us")
        if row.get("op") != "latency" or median is None:
            continue
        reference = base.get(row["payload"])
        row["ratio"] = float(median) / reference if reference else None


def run_benchmarks(
    config: Config,
    backend: RpcfastBackend,
    log: Callable[[str], None] = lambda line: None,
) -> list[Row]:
    """Measure every selected system at every payload; failures become error rows."""
    from perf import _peers

    rows: list[Row] = []
    for payload in config.payloads:
        for system in config.systems:
            measure: Measure
            if system in _peers.PEER_SYSTEMS:
                if not _peers.supports(system, payload):
                    continue
                measure = _peers.measure_peer
            elif backend.measure is None:
                rows.append(_stats.error_row(system, payload, backend.error or "not available"))
                continue
            else:
                measure = backend.measure
            log(f"{system}: payload {payload} B")
            try:
                samples = measure(system, payload, config.iterations, config.seconds)
                rows.append(_stats.latency_row(system, payload, samples))
            except Exception as exc:
                rows.append(_stats.error_row(system, payload, exc))
    add_ratios(rows, _peers.BASELINE_SYSTEM)
    if backend.throughput is not None:
        for system in config.systems:
            if system not in backend.systems:
                continue
            log(f"{system}: throughput, {THROUGHPUT_OUTSTANDING} outstanding")
            try:
                ops = backend.throughput(
                    system, THROUGHPUT_PAYLOAD, THROUGHPUT_OUTSTANDING, config.seconds
                )
                row = _stats.throughput_row(
                    system, THROUGHPUT_PAYLOAD, THROUGHPUT_OUTSTANDING, float(ops)
                )
            except Exception as exc:
                row = _stats.error_row(system, THROUGHPUT_PAYLOAD, exc, op="throughput")
            rows.append(row)
    return rows


def render(rows: Sequence[Row], systems: Sequence[str]) -> str:
    """The latency table (by payload, then run order), throughput table, and errors."""
    order = {name: i for i, name in enumerate(systems)}

    def key(row: Row) -> tuple[int, int, str]:
        payload = row["payload"]
        system = str(row["system"])
        return (payload if isinstance(payload, int) else -1, order.get(system, len(order)), system)

    ok = sorted((r for r in rows if "error" not in r), key=key)
    latency = [r for r in ok if r.get("op") == "latency"]
    throughput = [r for r in ok if r.get("op") == "throughput"]
    errors = sorted((r for r in rows if "error" in r), key=key)
    parts = ["Round-trip latency (us); ratio = median / raw-udp-poll median, same payload"]
    parts.append(_stats.format_table(latency, LATENCY_COLUMNS))
    if throughput:
        parts += ["", "Throughput (ops/s)", _stats.format_table(throughput, THROUGHPUT_COLUMNS)]
    if errors:
        # One line per (system, op, message): an import failure would otherwise repeat per payload.
        grouped: dict[tuple[str, str, str], list[str]] = {}
        for r in errors:
            grouped.setdefault((str(r["system"]), str(r["op"]), str(r["error"])), []).append(
                str(r["payload"])
            )
        parts += ["", "Errors"]
        parts += [
            f"  {system} {op} payload {','.join(payloads)}: {message}"
            for (system, op, message), payloads in grouped.items()
        ]
    return "\n".join(parts)


def _name_list(text: str) -> tuple[str, ...]:
    values = tuple(part.strip() for part in text.split(",") if part.strip())
    if not values:
        raise argparse.ArgumentTypeError("need one or more system names")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON here")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="print the time-trace breakdown of rpcfast round trips instead",
    )
    parser.add_argument(
        "--no-idle", action="store_true", help="skip the idle-server CPU measurement"
    )
    parser.add_argument(
        "--payloads",
        type=_args.int_list,
        default=DEFAULT_PAYLOADS,
        metavar="N,N,...",
        help="payload sizes in bytes (default: %(default)s)",
    )
    parser.add_argument(
        "--systems",
        type=_name_list,
        metavar="NAME,...",
        help="only these systems (default: all rpcfast systems, then all peers)",
    )
    parser.add_argument(
        "--iterations",
        type=_args.positive_int,
        help=f"at most this many timed round trips per measurement (default {DEFAULT_ITERATIONS})",
    )
    parser.add_argument(
        "--seconds",
        type=_args.positive_float,
        help=f"at most about this long per measurement (default {DEFAULT_SECONDS})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK_ITERATIONS} iterations, {QUICK_SECONDS} s unless given",
    )


IDLE_SECONDS = 3.0


def _breakdown(config: Config, log: Callable[[str], None]) -> int:
    """``--breakdown``: where an rpcfast round trip's time goes, per payload and transport."""
    from perf import _rpcfast_bench

    for system in config.systems:
        if system not in _rpcfast_bench.RPCFAST_SYSTEMS:
            continue
        for payload in config.payloads:
            log(f"{system}: traced payload {payload} B")
            print(_rpcfast_bench.breakdown(system, payload, config.iterations, config.seconds))
            print()
    return 0


def run(args: argparse.Namespace) -> int:
    backend = RpcfastBackend.load()
    known = all_systems(backend)
    systems: tuple[str, ...] = args.systems if args.systems is not None else known
    unknown = [s for s in systems if s not in known]
    if unknown:
        print(f"unknown systems: {', '.join(unknown)}; known: {', '.join(known)}", file=sys.stderr)
        return 2
    systems = tuple(s for s in known if s in systems)
    config = Config(
        payloads=tuple(args.payloads),
        systems=systems,
        iterations=args.iterations or (QUICK_ITERATIONS if args.quick else DEFAULT_ITERATIONS),
        seconds=args.seconds or (QUICK_SECONDS if args.quick else DEFAULT_SECONDS),
    )

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if args.breakdown:
        return _breakdown(config, log)
    print(f"rpcfast hot path compiled with mypyc: {importlib.import_module('rpcfast').COMPILED}")
    rows = run_benchmarks(config, backend, log)
    if not args.no_idle and "rpcfast-udp" in systems:
        log("rpcfast-udp: idle server CPU")
        try:
            from perf import _rpcfast_bench

            idle = _rpcfast_bench.idle_cpu("rpcfast-udp", IDLE_SECONDS)
            rows.append({"op": "idle_cpu", "system": "rpcfast-udp", "payload": 0, **idle})
        except Exception as exc:
            rows.append(_stats.error_row("rpcfast-udp", 0, exc, op="idle_cpu"))
    print(render(rows, systems))
    for row in rows:
        if row.get("op") == "idle_cpu" and "error" not in row:
            print(
                f"\nidle rpcfast-udp server after its spin budget: "
                f"{100 * float(row['cpu_fraction']):.2f}% of a core "  # type: ignore[arg-type]
                f"over {row['seconds']} s"
            )
    if args.json:
        _stats.write_json(
            args.json,
            rows,
            _stats.machine_info(("rpcfast", "pyzmq", "pycapnp", "grpcio", "trio")),
            {
                "payloads": list(config.payloads),
                "systems": list(config.systems),
                "iterations": config.iterations,
                "seconds": config.seconds,
            },
        )
    return 0 if any(r.get("op") == "latency" and "error" not in r for r in rows) else 1
