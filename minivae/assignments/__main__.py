"""Command line: ``python -m minivae.assignments {make,grade,list}``."""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
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
    m.add_argument("--manifest", default=None,
                   help="where to keep the hashes the grader needs (default: OUT_DIR.manifest.json, beside the "
                        "copy; keep it, do not hand it out)")
    m.add_argument("--hide-derivations", action="store_true",
                   help="replace the derived gradients in the exercise docstrings by 'derive this: ...'")
    g = sub.add_parser("grade", help="grade one or many submissions")
    g.add_argument("dirs", nargs="+", metavar="SUBMISSION",
                   help="a student's folder (holding minivae/), a .zip of one, or a folder of them")
    g.add_argument("--json", metavar="FILE", default=None, help="write the report as JSON (one submission)")
    g.add_argument("--out", metavar="DIR", default=None,
                   help="write gradebook.csv and one JSON report per student here")
    g.add_argument("--jobs", type=int, default=1,
                   help=f"submissions graded in parallel (default 1; at most the CPUs, and the memory / "
                        f"{grading.CHECK_BYTES >> 30} GiB)")
    g.add_argument("--exercises", default=None,
                   help="comma-separated ids to grade, or 'all' (default: the manifest's exercises; without a manifest "
                        "this is required)")
    g.add_argument("--manifest", default=None,
                   help="the manifest written by make: grades exactly its exercises, checks the starter and grader")
    g.add_argument("--timeout", type=float, default=grading.DEFAULT_TIMEOUT,
                   help=f"seconds per exercise before it counts as hanging (default {grading.DEFAULT_TIMEOUT:g})")
    g.add_argument("--seed", type=int, default=None,
                   help="the batch's secret seed; each student's inputs come from it and the student's name "
                        "(default: a fresh one, recorded in every report: give it again to regrade)")
    g.add_argument("--no-sandbox", action="store_true",
                   help="run student code without the bubblewrap sandbox (recorded in every report and the "
                        "gradebook); only for code you trust")
    sub.add_parser("list", help="list the exercises")
    return p


def _interrupt(signum, frame):
    from ..signals import Terminated
    raise Terminated()                 # SIGTERM stops a batch as Ctrl-C does (the gradebook is still written), exit 143


def _check_json_path(json_path, submission, manifest):
    """ValueError (one line) if the report would be written over the manifest or into the submission it grades
    (``--json alice/minivae/gaussian.py`` once replaced the student's file with the report)."""
    from ..atomic import same_file
    target = Path(json_path).resolve()
    if manifest is not None and same_file(json_path, manifest):
        raise ValueError(f"--json {json_path} is the manifest {manifest}, which this command reads: choose another path")
    if target == submission or submission in target.parents:
        raise ValueError(f"--json {json_path} is inside the submission {submission}, which this command reads: "
                         "write the report outside it")


def main(argv=None):
    args = _parser().parse_args(argv)
    prev = None
    if threading.current_thread() is threading.main_thread():
        # SIGTERM as Ctrl-C, for every command: a batch still writes its gradebook, and make removes its
        # half-made copy (the default action killed it mid-copy, leaving a folder that blocks the rerun)
        prev = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _run(args)
    finally:
        if prev is not None:
            signal.signal(signal.SIGTERM, prev)


def _run(args):
    try:
        if args.cmd == "list":
            for e in EXERCISES:
                print(f"{e.id:<28} minivae/{e.file:<15} {e.title}")
            return 0
        if args.cmd == "make":
            manifest = args.manifest or str(Path(args.out_dir).resolve()) + ".manifest.json"
            info = make_starter(args.out_dir, select(args.exercises), source=args.source, manifest=manifest,
                                hide_derivations=args.hide_derivations)
            print(f"wrote the student copy to {info['out']}")
            print(f"stubbed {len(info['stubbed'])} exercise(s): {', '.join(info['stubbed']) or 'none'}")
            print(f"wrote the manifest to {manifest} (keep it for grading; it is not part of the copy)")
            return 0
        if args.manifest is None and args.exercises is None:
            # a starter made for some exercises still holds the reference solutions of the others: grading
            # "everything" would count those (an untouched 3-exercise starter once scored 81.25)
            raise ValueError("say what to grade: --manifest FILE (the exercises make handed out) or --exercises "
                             "IDS (or --exercises all, for a copy in which every exercise was assigned)")
        ids = None if args.exercises is None else select(args.exercises)
        if ids is not None and not ids:
            raise ValueError("no exercises to grade")
        grading.check_jobs(args.jobs)                  # before any work: a bound of CPUs and memory
        sandbox = not args.no_sandbox
        subs = grading.expand_submissions(args.dirs)
        single = len(subs) == 1 and args.out is None and Path(subs[0][1]).suffix.lower() != ".zip"
        if single:
            name, path, notes = subs[0]
            report_dir = grading.check_student_dir(path)
            if args.json:
                _check_json_path(args.json, report_dir, args.manifest)
            print(grading.format_header(report_dir), flush=True)
            report = grading.grade(report_dir, ids, timeout=args.timeout, seed=args.seed, manifest=args.manifest,
                                   sandbox=sandbox, name=name,
                                   progress=lambda r: print(grading.format_line(r), flush=True))
            report["notes"] = notes + report["notes"]
            print(grading.format_footer(report))
            # the secret seed goes to the instructor only: stderr, never the report a student may be shown
            print(f"secret seed, for the instructor only: {report['seed']} (--seed {report['seed']} reproduces "
                  f"this run)", file=sys.stderr)
            if args.json:
                grading.write_atomic(args.json, json.dumps(grading.public(report), indent=2) + "\n")
                print(f"wrote {args.json}")
            return 0
        if args.json:
            raise ValueError("--json takes one submission; use --out DIR for many")
        out = args.out or "grades"
        target = Path(out).resolve()
        for _, path, _ in subs:                 # the reports go beside the submissions, never into one
            sub = Path(path).resolve()
            if sub.is_dir() and (target == sub or sub in target.parents):
                raise ValueError(f"--out {out} is inside the submission {path}, which this command reads: "
                                 "write the gradebook outside it")
        reports, stopped = grading.grade_batch(args.dirs, ids, timeout=args.timeout, seed=args.seed,
                                               jobs=args.jobs, out_dir=out, manifest=args.manifest,
                                               progress=True, sandbox=sandbox)
        for name in sorted(reports):
            r = reports[name]
            state = "" if r.get("graded") else "  not graded"
            print(f"{name:<24} {r['score']:6.2f}  ({r['passed']} of {r['total']}){state}")
        print(f"the secret seed is in {Path(out) / grading.SEED_FILE} (--seed with it reproduces this run; do "
              f"not hand it out)")
        print(f"wrote {Path(out) / 'gradebook.csv'} and {len(reports)} report(s) in {out}")
        if stopped:
            print(f"stopped early: {stopped}; the students not graded are marked so", file=sys.stderr)
            return grading.stop_exit_code(stopped)
        return 0
    except KeyboardInterrupt as e:
        why = grading.stop_reason(e)
        print(why, file=sys.stderr)
        return grading.stop_exit_code(why)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {grading.clean(' '.join(str(e).split()), 1000)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
