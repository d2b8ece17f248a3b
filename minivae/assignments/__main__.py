"""Command line: ``python -m minivae.assignments {make,grade,list}``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import grading
from .exercises import EXERCISES, select
from .make import make_starter


def _parser():
    p = argparse.ArgumentParser(prog="python -m minivae.assignments",
                                description="Make student copies of minivae and grade them.")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="write a student copy with exercise stubs")
    m.add_argument("out_dir", metavar="OUT_DIR", help="new (or empty) folder for the student copy")
    m.add_argument("--exercises", default="all",
                   help="comma-separated exercise ids to stub, 'all' (default) or 'none'")
    m.add_argument("--source", default=None, help="reference repository root (default: this installation's)")
    g = sub.add_parser("grade", help="grade a student copy")
    g.add_argument("dir", metavar="DIR", help="the folder holding the student's minivae/")
    g.add_argument("--json", metavar="FILE", default=None, help="also write the report as JSON")
    g.add_argument("--exercises", default="all", help="comma-separated ids to grade (default: all)")
    g.add_argument("--timeout", type=float, default=grading.DEFAULT_TIMEOUT,
                   help=f"seconds per exercise before it counts as hanging (default {grading.DEFAULT_TIMEOUT:g})")
    g.add_argument("--seed", type=int, default=grading.DEFAULT_SEED, help="seed of the check inputs")
    sub.add_parser("list", help="list the exercises")
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "list":
            for e in EXERCISES:
                print(f"{e.id:<24} minivae/{e.file:<15} {e.title}")
            return 0
        if args.cmd == "make":
            info = make_starter(args.out_dir, select(args.exercises), source=args.source)
            print(f"wrote the student copy to {info['out']}")
            print(f"stubbed {len(info['stubbed'])} exercise(s): {', '.join(info['stubbed']) or 'none'}")
            return 0
        ids = select(args.exercises)
        if not ids:
            raise ValueError("no exercises to grade")
        report_dir = grading.check_student_dir(args.dir)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        print(grading.format_header(report_dir), flush=True)
        report = grading.grade(report_dir, ids, timeout=args.timeout, seed=args.seed,
                               progress=lambda r: print(grading.harness.format_line(r), flush=True))
        print(grading.format_footer(report))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            print(f"wrote {args.json}")
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
