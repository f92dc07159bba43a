"""``rpcfast-perf floor``: what a replicated write costs on this host before any software.

A durable write with R replicas is a chain of processes: client -> master -> R backups ->
master -> client. On a small host the processes outnumber the cores, and each hop may have to
wake a sleeping process (on a VM, through the hypervisor). This benchmark measures that chain
with nothing else in it: a C program (``_floor_chain.c``, built here with the system's C
compiler) whose processes only forward datagrams over loopback UDP, for R = 0 (a plain round
trip, the shape of a read) and for each R asked, with three ways of waiting:

* ``block``: blocking ``recvfrom`` (every hop is a wake-up);
* ``yield``: non-blocking ``recvfrom`` and ``sched_yield`` between tries (no one sleeps, and a
  process that waits hands its core to any other that can run);
* ``spin``: non-blocking ``recvfrom`` in a tight loop (fine while processes <= cores; past that
  the scheduler's time slices decide, and the run is cut at its time bound).

``x_read`` divides each median by the best R = 0 median of the run: how far a replicated write
on this host is from a read at the very least, whatever the software. ``rpcfast-perf kv``'s
R = 3 target (a write within 3x the read) can only be met where this ratio is well below 3.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from perf import _args, _stats
from perf._stats import Column, Row

HELP = "The host's floor for a replicated write: a bare C process chain over loopback UDP."

SOURCE = Path(__file__).with_name("_floor_chain.c")
MODES: tuple[str, ...] = ("block", "yield", "spin")
DEFAULT_REPLICAS: tuple[int, ...] = (0, 1, 3)
MAX_REPLICAS = 8
RUN_GRACE_S = 10.0  # beyond the program's own time bound, before it is killed

COLUMNS = (
    Column("replicas", "R"),
    Column("mode", "mode"),
    Column("count", "count"),
    Column("median_us", "median_us", "{:.1f}"),
    Column("p99_us", "p99_us", "{:.1f}"),
    Column("x_read", "x read", "{:.2f}"),
    Column("truncated", "cut"),
    Column("error", "error"),
)


class FloorError(RuntimeError):
    """The C chain could not be built or did not run to the end."""


def build(directory: Path) -> Path:
    """Compile the chain program into ``directory``; the executable's path."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise FloorError("no C compiler (cc or gcc) on PATH")
    exe = directory / "floor_chain"
    proc = subprocess.run(
        [compiler, "-O2", "-o", str(exe), str(SOURCE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        raise FloorError(f"compiling {SOURCE.name} failed: {proc.stderr.strip()}")
    return exe


def run_chain(exe: Path, replicas: int, mode: str, iterations: int, seconds: float) -> Row:
    """One measurement: the program's JSON line as a row (``system`` = ``c-udp-chain``)."""
    argv = [str(exe), str(replicas), mode, str(iterations), str(seconds)]
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=seconds + RUN_GRACE_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise FloorError(f"R={replicas} {mode}: no answer within {exc.timeout:.0f} s") from None
    if proc.returncode != 0:
        raise FloorError(f"R={replicas} {mode}: {proc.stderr.strip() or proc.returncode}")
    result = json.loads(proc.stdout)
    return {
        "system": "c-udp-chain",
        "replicas": int(result["replicas"]),
        "mode": str(result["mode"]),
        "count": int(result["count"]),
        "median_us": float(result["median_us"]),
        "p99_us": float(result["p99_us"]),
        "truncated": int(result["truncated"]),
    }


def add_ratios(rows: list[Row]) -> None:
    """``x_read``: each median over the best R = 0 median of the run."""
    reads = [
        float(r["median_us"] or 0)
        for r in rows
        if r.get("replicas") == 0 and "error" not in r and r.get("median_us")
    ]
    if not reads:
        return
    best = min(reads)
    for r in rows:
        if "error" not in r and r.get("median_us"):
            r["x_read"] = float(r["median_us"] or 0) / best


def measure(
    replicas: Sequence[int], modes: Sequence[str], iterations: int, seconds: float
) -> list[Row]:
    """Every (R, mode), R = 0 included; a failed one is an error row."""
    wanted = sorted({0, *replicas})
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="rpcfast-floor-") as tmp:
        exe = build(Path(tmp))
        for r in wanted:
            for mode in modes:
                try:
                    rows.append(run_chain(exe, r, mode, iterations, seconds))
                except FloorError as exc:
                    rows.append(
                        {"system": "c-udp-chain", "replicas": r, "mode": mode, "error": str(exc)}
                    )
    add_ratios(rows)
    return rows


def _replicas(text: str) -> tuple[int, ...]:
    values = _args.int_list(text)
    if any(v > MAX_REPLICAS for v in values):
        raise argparse.ArgumentTypeError(f"at most {MAX_REPLICAS} replicas")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON here")
    parser.add_argument(
        "--replicas",
        type=_replicas,
        default=DEFAULT_REPLICAS,
        metavar="R,...",
        help="backups per write (R = 0 is always measured too; default 0,1,3)",
    )
    parser.add_argument(
        "--modes",
        type=_args.subset_of(MODES),
        default=MODES,
        metavar="M,...",
        help="block,yield,spin (all)",
    )
    parser.add_argument("--iterations", type=_args.positive_int, default=20_000)
    parser.add_argument(
        "--seconds",
        type=_args.positive_float,
        default=3.0,
        help="time bound per measurement (default 3)",
    )


def run(args: argparse.Namespace) -> int:
    rows = measure(args.replicas, args.modes, args.iterations, args.seconds)
    print("A bare C chain, client -> master -> R backups -> master -> client (loopback UDP):")
    print("x read = median over the best R = 0 median of this run")
    print(_stats.format_table(rows, COLUMNS))
    if args.json:
        config = {
            "replicas": list(args.replicas),
            "modes": list(args.modes),
            "iterations": args.iterations,
            "seconds": args.seconds,
        }
        _stats.write_json(args.json, rows, _stats.machine_info(), config)
        print(f"wrote {args.json}")
    return 1 if all("error" in r for r in rows) else 0
