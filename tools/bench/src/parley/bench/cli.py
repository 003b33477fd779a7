"""`parley-bench`: every benchmark in one run, each against a baseline measured in that run.

    parley-bench                  # the full run: bench/results/latest.md and latest.json
    parley-bench --smoke          # a few seconds per section: the harness still works
    parley-bench --user-addr 127.0.0.1:50051 --chat-addr 127.0.0.1:50052,127.0.0.1:50053 \\
        --token "$PARLEY_TOKEN"   # a running stack instead of one started for the run

Exits 0 when every measurement was made, whether or not it met its target; 1 when the
harness itself failed (a section raised, or counted nothing); 2 on bad usage.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from parley.bench.baseline import start_broadcast_server, start_echo_server
from parley.bench.chat import measure_chat
from parley.bench.cluster import measure_cluster
from parley.bench.hotroom import measure_hot_room
from parley.bench.idle import measure_idle
from parley.bench.listusers import fill_users, measure_listusers, user_item_size
from parley.bench.plan import FULL, SMOKE, Plan, close_workers
from parley.bench.report import Report, Row
from parley.bench.retention import measure_retention
from parley.bench.rooms import measure_foreign_rooms
from parley.bench.startup import measure_startup
from parley.bench.target import Target, started_stack
from parley.bench.tracing import measure_tracing
from parley.bench.unary import Reader, make_reader, measure_unary

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parley-bench",
        description="Parley's benchmarks, each a ratio to a baseline measured in the same run.",
    )
    parser.add_argument("--smoke", action="store_true", help="a tiny run: does the harness work")
    parser.add_argument("--duration", type=float, help="measured seconds per load test")
    parser.add_argument("--warm-up", type=float, help="unmeasured seconds before each")
    parser.add_argument("--concurrency", type=int, help="calls in flight in total")
    parser.add_argument("--processes", type=int, help="load generator processes")
    parser.add_argument("--users", type=int, help="users in the ListUsers table")
    parser.add_argument("--chat-streams", type=int, help="listening chat streams")
    parser.add_argument("--chat-senders", type=int, help="sending chat streams")
    parser.add_argument("--idle-streams", type=int, help="idle chat streams for the memory row")
    parser.add_argument("--hot-senders", type=int, help="writers for the hot-room row")
    parser.add_argument(
        "--only",
        help="comma-separated sections to run (default: all), e.g. 'idle streams,hot room'; "
        "the sections: start-up, unary, ListUsers, chat fan-out, tracing, rooms not served, "
        "redis cluster, idle streams, retention, hot room",
    )
    parser.add_argument("--user-addr", help="a running UserService instead of a started stack")
    parser.add_argument("--chat-addr", help="its two chat replicas, comma-separated")
    parser.add_argument(
        "--token",
        help="with --user-addr: a token with users:write whose subject is an existing user",
    )
    parser.epilog = (
        "A running stack's chat replicas must run with PARLEY_CHAT_RATE_LIMIT and "
        "PARLEY_CHAT_RATE_BURST raised (e.g. 100000): the senders are machines. The memory "
        "and start-up rows need a stack started by the harness."
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="results folder")
    parser.add_argument("--name", help="file name without extension (latest, or smoke)")
    return parser


@contextmanager
def _target(args: argparse.Namespace) -> Iterator[Target]:
    if args.user_addr is None:
        with started_stack() as target:
            yield target
        return
    chats = [a.strip() for a in (args.chat_addr or "").split(",") if a.strip()]
    if len(chats) == 1:
        chats *= 2
    yield Target(user=args.user_addr, chats=(chats[0], chats[1]), fixed_token=args.token)


def _say(message: str) -> None:
    print(f"parley-bench: {message}", file=sys.stderr, flush=True)


def _section(report: Report, name: str, body: Callable[[], object]) -> None:
    if not report.selected(name):
        return
    started = time.monotonic()
    _say(f"{name} ...")
    try:
        body()
    except Exception as error:
        traceback.print_exc()
        report.add(Row(name=f"{name}: harness error", broken=True, notes=f"{error!r}"[:300]))
    _say(f"{name} done in {time.monotonic() - started:.1f} s")


def run(args: argparse.Namespace) -> Report:
    base = SMOKE if args.smoke else FULL
    plan: Plan = base.with_overrides(
        duration=args.duration,
        warm_up=args.warm_up,
        concurrency=args.concurrency,
        processes=args.processes,
        users=args.users,
        chat_streams=args.chat_streams,
        chat_senders=args.chat_senders,
        idle_streams=args.idle_streams,
        hot_senders=args.hot_senders,
    )
    title = "Parley benchmarks" + (" (smoke run)" if args.smoke else "")
    report = Report(
        title,
        settings={
            "load": f"{plan.processes} client processes, {plan.concurrency} calls in flight, "
            f"{plan.warm_up:g} s warm-up + {plan.duration:g} s measured per row",
            "table": f"{plan.users:,} users",
        },
    )
    if args.only:
        report.only = frozenset(name.strip() for name in args.only.split(",") if name.strip())
        report.settings["sections"] = ", ".join(sorted(report.only)) + " (the others not run)"
    started = time.monotonic()
    with ExitStack() as stack:
        stack.callback(close_workers)
        _say("starting the stack" if args.user_addr is None else f"targeting {args.user_addr}")
        target = stack.enter_context(_target(args))
        report.settings["stack"] = (
            "started by the harness (UserService, 2 chat replicas, machine Postgres and Redis)"
            if target.started
            else f"running stack at {target.user}, {', '.join(target.chats)}"
        )
        _section(report, "start-up", lambda: measure_startup(target, plan, report))

        def prepare() -> tuple[str, Reader]:
            if target.endpoints is not None:
                fill_users(target.endpoints.database_url, plan.users)
            reader = make_reader(target)
            echo = start_echo_server(reader.reply_size, user_item_size(target), plan.big_page)
            stack.callback(echo.close)
            return echo.address, reader

        _say(f"filling the users table ({plan.users:,}) and starting the echo baseline")
        try:
            echo_address, reader = prepare()
        except Exception as error:
            traceback.print_exc()
            report.add(Row(name="preparation: harness error", broken=True, notes=repr(error)))
        else:
            _section(
                report, "unary", lambda: measure_unary(target, echo_address, reader, plan, report)
            )
            _section(
                report, "ListUsers", lambda: measure_listusers(target, echo_address, plan, report)
            )

        def chat() -> None:
            with start_broadcast_server() as broadcast:
                measure_chat(target, broadcast.address, plan, report)

        _section(report, "chat fan-out", chat)
        _section(report, "rooms not served", lambda: measure_foreign_rooms(target, plan, report))
        _section(report, "redis cluster", lambda: measure_cluster(target, plan, report))
        _section(report, "idle streams", lambda: measure_idle(target, plan, report))
        _section(report, "retention", lambda: measure_retention(target, plan, report))
        _section(report, "hot room", lambda: measure_hot_room(target, plan, report))
        # Last: its three more fan-outs leave grpc channels of closed event loops to the
        # collector, and a section run after them once waited 120 s for its messages.
        _section(report, "tracing", lambda: measure_tracing(target, plan, report))
    report.elapsed = time.monotonic() - started
    report.load_after = os.getloadavg()[0]
    return report


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.user_addr is not None and (not args.token or not args.chat_addr):
        _parser().error("--user-addr needs --chat-addr and --token")
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    report = run(args)
    if args.only and not report.rows:
        _parser().error(f"--only {args.only!r} names no section that ran")
    name = args.name or ("smoke" if args.smoke else "latest")
    markdown, data = report.write(args.out, name)
    print(report.markdown())
    _say(f"wrote {markdown} and {data} in {report.elapsed:.0f} s")
    if report.broken:
        _say(f"the harness failed: {', '.join(row.name for row in report.broken)}")
        return 1
    if report.failed:
        _say(f"targets missed (reported, not an error): {len(report.failed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
