"""``reaas-keys``: issue, list and revoke API keys, and export the usage ledger for billing.

Works on the same SQLite file as a running ``reaas-server --ledger`` (WAL lets both use it at once); a key
added or revoked here takes effect on the server's next call.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from pathlib import Path

from reaas_client.command_line import CommandLineParser, add_standard_flags, reported_errors
from reaas_server.ledger import (
    LedgerError,
    LedgerOpenError,
    LedgerUnavailable,
    SqlLedger,
    default_ledger_path,
    open_ledger,
)
from reaas_server.quotas import QuotaBook, describe_period

PERIODS = {"minute": 60, "hour": 3600, "day": 86400, "week": 7 * 86400}


def _period_seconds(text: str) -> int:
    if text in PERIODS:
        return PERIODS[text]
    try:
        seconds = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a period is one of {', '.join(PERIODS)} or a number of seconds") from None
    if seconds < 1:
        raise argparse.ArgumentTypeError("a period must be at least 1 second")
    return seconds


def _since(text: str) -> float:
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an ISO date like 2026-11-01 or 2026-11-01T12:00, got {text!r}") from None


LEDGER_ENVIRONMENT = {"REAAS_LEDGER": "the ledger file when --ledger is not given (default: "
                                      "$XDG_STATE_HOME/reaas/ledger.sqlite3, i.e. ~/.local/state/reaas/...)"}


def ledger_argument(text: str) -> str:
    """argparse ``type=`` for --ledger: a file (created if absent), not a folder."""
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give the ledger file, e.g. {Path(text) / 'ledger.sqlite3'}")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(prog="reaas-keys", description=__doc__.split("\n\n")[0],
                               environment=LEDGER_ENVIRONMENT)
    help_text = "the server's ledger file; may also follow the subcommand (default: $REAAS_LEDGER, else %(default)s)"
    parser.add_argument("--ledger", type=ledger_argument, default=str(default_ledger_path()), help=help_text)
    add_standard_flags(parser)
    # The same flag after the subcommand; SUPPRESS leaves the one given before it (or the default) alone when absent.
    ledger_after = argparse.ArgumentParser(add_help=False)
    ledger_after.add_argument("--ledger", type=ledger_argument, default=argparse.SUPPRESS,
                              help="the server's ledger file (as before the subcommand)")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[ledger_after], environment=LEDGER_ENVIRONMENT, **kwargs)

    add = command("add", help="issue a key; its secret is printed once and stored only hashed")
    add.add_argument("name", help="who the key is for; shown in usage reports, logs and exports")
    add.add_argument("--quota", type=int, default=None, metavar="QUERIES",
                     help="queries (images) allowed per --period (default: no quota)")
    add.add_argument("--period", type=_period_seconds, default=PERIODS["day"],
                     help="quota period: minute, hour, day, week or seconds; periods start at multiples of it "
                     "since the Unix epoch, so 'day' resets at 00:00 UTC (default: day)")
    add.add_argument("--max-concurrent-calls", type=int, default=None,
                     help="calls this key may have in flight at once (default: the server's --max-calls-per-key)")
    command("list", help="every key: name, state, quota and what it used")
    revoke = command("revoke", help="revoke a key by name (its usage stays in the ledger)")
    revoke.add_argument("name")
    export = command("export", help="write the usage ledger as CSV, one row per answered call")
    export.add_argument("csv", type=Path, help="output file")
    export.add_argument("--since", type=_since, default=None, help="only calls from this date on (local time)")
    return parser


def _list(ledger: SqlLedger) -> str:
    quotas = QuotaBook(ledger)
    lines = [f"{'name':<20} {'state':<8} {'created (UTC)':<17} {'queries':>12}  quota"]
    for key in ledger.api_keys():
        total = sum(t.queries for t in ledger.totals(key.name))
        status = quotas.status(key)
        quota = (f"{status.used}/{status.limit} per {describe_period(status.period_s)}" if status else "none")
        created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(key.created_at))
        lines.append(f"{key.name:<20} {'active' if key.active else 'revoked':<8} {created:<17} {total:>12}  {quota}")
    if len(lines) == 1:
        lines.append("(no keys issued: the server is in open access, billing every caller as 'anonymous'; "
                     "the first key issued ends that)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with reported_errors(parser.prog, debug=args.debug,
                         usage_errors=(LedgerError, LedgerOpenError, LedgerUnavailable)):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    ledger = open_ledger(args.ledger)  # LedgerOpenError / LedgerUnavailable: one line naming the ledger and fix
    try:
        if args.command == "add":
            secret = ledger.add_key(args.name, quota_queries=args.quota,
                                    quota_period_s=args.period if args.quota is not None else None,
                                    max_concurrent_calls=args.max_concurrent_calls)
            print(secret)
            print(f"key {args.name!r} added to {ledger.describe()}; the secret above is shown only now", file=sys.stderr)
        elif args.command == "list":
            print(_list(ledger))
        elif args.command == "revoke":
            ledger.revoke_key(args.name)
            print(f"key {args.name!r} revoked", file=sys.stderr)
        elif args.command == "export":
            rows = ledger.export_csv(args.csv, since=args.since)
            print(f"{rows} usage rows written to {args.csv}", file=sys.stderr)
    finally:
        ledger.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
