"""Command line: `python -m fastcache info | demo` (also installed as the `fastcache` script)."""

from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastcache", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, compiled kernels, and which backend each device gets")
    demo = commands.add_parser("demo", help="the fused contrastive op against sentence-transformers")
    demo.add_argument("--pairs", type=int, default=256, help="real (query, passage) pairs to compare on")
    demo.add_argument("--batch-size", type=int, default=4096, help="queries in the timed loss stage")
    args = parser.parse_args(argv)
    if args.command == "info":
        import fastcache

        print(json.dumps(fastcache.info(), indent=2))
    else:
        if args.pairs < 2 or args.batch_size < 1:
            parser.error("--pairs must be >= 2 and --batch-size >= 1")
        from fastcache.demo import run_demo

        run_demo(pairs=args.pairs, batch_size=args.batch_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
