"""The ``fastnorm`` command (also ``python -m fastnorm``).

    fastnorm scan LOGDIR [--json] [--tags KEY=TAG[,KEY=TAG...]] [--plot OUT.png] [--lookback N]

Exit status: 0 when no run is critical, 1 when one is (it diverged or a critical rule fired),
2 on a usage error or a directory that cannot be read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from fastnorm.monitoring.scan import SEED_TAGS

EXIT_OK, EXIT_CRITICAL, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastnorm", description="fastnorm command-line tools")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    scan = commands.add_parser(
        "scan", help="find the signature of an advantage-normalization blow-up in TensorBoard logs",
        description="Scans every run (directory with TensorBoard event files) under LOGDIR for the seed's "
                    "signature: advantage std in the vulnerability window, norm_max_abs and grad_norm spikes, "
                    "clip fraction above 0.9, negative explained variance, the first non-finite value. "
                    "Exit status 0: nothing critical; 1: a run diverged or a critical rule fired; "
                    "2: usage error or unreadable directory.",
        epilog="tag keys and their defaults: " + ", ".join(f"{k}={v}" for k, v in SEED_TAGS.items()),
    )
    scan.add_argument("logdir", metavar="LOGDIR", help="a run directory, or a directory of runs")
    scan.add_argument("--json", action="store_true", help="print the report as JSON")
    scan.add_argument("--tags", action="append", default=[], metavar="KEY=TAG[,KEY=TAG...]",
                      help="read keys from other tags, e.g. grad_norm=optim/grad_norm,clip_fraction=ppo/clip "
                           "(repeatable)")
    scan.add_argument("--plot", metavar="OUT.png", help="draw each run's key series with the alerts marked")
    scan.add_argument("--lookback", type=int, default=50, metavar="N",
                      help="logged points before a divergence searched for its precursors (default 50)")
    scan.set_defaults(handler=_scan, command_parser=scan)
    return parser


def _scan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from fastnorm.monitoring.events import MissingExtraError
    from fastnorm.monitoring.scan import as_json, format_text, parse_tag_mapping, scan

    try:
        tags = parse_tag_mapping(item for arg in args.tags for item in arg.split(","))
    except ValueError as error:
        parser.error(f"--tags: {error}")
    if args.lookback < 0:
        parser.error(f"--lookback must be >= 0, got {args.lookback}")
    if args.plot and not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):
        parser.error(f"--plot: the directory of {args.plot!r} does not exist")
    try:
        reports = scan(args.logdir, tags, lookback=args.lookback)
    except MissingExtraError as error:
        print(f"fastnorm scan: {error}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:
        print(f"fastnorm scan: cannot read {args.logdir!r}: {error.strerror or error}", file=sys.stderr)
        return EXIT_USAGE
    if not reports:
        print(f"fastnorm scan: no TensorBoard event files (events.out.tfevents.*) under {args.logdir!r}",
              file=sys.stderr)
        return EXIT_USAGE
    if args.plot:
        from fastnorm.monitoring.scan_plot import plot_reports

        try:
            plot_reports(reports, args.plot)
        except (MissingExtraError, OSError, ValueError) as error:
            print(f"fastnorm scan: cannot write the plot {args.plot!r}: {error}", file=sys.stderr)
            return EXIT_USAGE
    if args.json:
        print(json.dumps(as_json(reports, args.logdir, tags), indent=2, allow_nan=False))
    else:
        print(format_text(reports))
    return EXIT_CRITICAL if any(r.critical for r in reports) else EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the command line ``argv`` (default: sys.argv[1:]) and returns its exit status."""
    try:
        args = _parser().parse_args(argv)
        return args.handler(args, args.command_parser)
    except SystemExit as usage:  # argparse's --help (0) and usage errors (2)
        return usage.code


if __name__ == "__main__":
    sys.exit(main())
