"""Mutation score per module from mutmut's results in mutants/ (run by tools/mutation.sh).

score = killed / (killed + survived), where "killed" counts mutants that made a test fail, crash or time
out.  Survivors listed in tests/EQUIVALENT_MUTANTS.md (equivalent programs: no test can tell them apart)
are reported separately and left out of the denominator of the adjusted score.  Mutants that no selected
test reaches ("no tests") are listed too: they count as survivors.
"""
import fnmatch
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

KILLED = {1, 3, 36, -24, 24, 152, 255, -11, -9}         # test failed, pytest error, timeout, crash
TIMEOUT = {36, -24, 24}                                  # (counted as killed, as mutmut does; shown apart)
SURVIVED = {0, 5, 33}                                    # tests passed, or no test reached the mutant


def selected(name, patterns):
    """Whether a mutant's name matches one of the globs (no globs: every mutant)."""
    return not patterns or any(fnmatch.fnmatch(name, p) for p in patterns)


def equivalent_names(path=Path("tests/EQUIVALENT_MUTANTS.md")):
    if not path.exists():
        return set()
    return set(re.findall(r"`(minivae\.[\w.]+__mutmut_\d+)`", path.read_text()))


def unchecked(patterns):
    """Names of the mutants matching ``patterns`` that have no result yet (to resume a run)."""
    for meta in sorted(Path("mutants").rglob("*.py.meta")):
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            if code is None and selected(name, patterns):
                print(name)
    return 0


def targets(path=Path("tools/mutation_targets.txt")):
    """The name globs a run with no arguments covers (tools/mutation.sh)."""
    lines = path.read_text().splitlines() if path.exists() else []
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def main(patterns):
    if patterns[:1] == ["--unchecked"]:
        return unchecked(patterns[1:] or targets())
    markdown = patterns[:1] == ["--markdown"]          # the README's table
    patterns = patterns[1:] if markdown else patterns
    patterns = patterns or targets()
    equivalent = equivalent_names()
    per = defaultdict(lambda: {"killed": 0, "survived": 0, "equivalent": 0, "not checked": 0, "timeout": 0})
    survivors = []
    for meta in sorted(Path("mutants").rglob("*.py.meta")):
        module = str(meta.relative_to("mutants"))[:-len(".py.meta")].replace("/", ".")
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            if not selected(name, patterns):
                continue
            row = per[module]
            if code is None:
                row["not checked"] += 1
            elif code in KILLED:
                row["killed"] += 1
                row["timeout"] += code in TIMEOUT
            elif name in equivalent:
                row["equivalent"] += 1
            else:
                row["survived"] += 1
                survivors.append((name, "no test reaches it" if code in (5, 33) else "survived"))
    if not per:
        print("no mutmut results in mutants/: run `bash tools/mutation.sh` first")
        return 1
    if markdown:
        return _markdown(per)
    print(f"{'module':34s} {'killed':>7s} {'(t/o)':>6s} {'surv.':>6s} {'equiv.':>6s} {'unrun':>6s} {'score':>7s} "
          f"{'adj.':>7s}")
    tot = defaultdict(int)
    for module, r in sorted(per.items()):
        for k, v in r.items():
            tot[k] += v
        print(_line(module, r))
    print(_line("all", tot))
    if survivors:
        print(f"\n{len(survivors)} survivor(s) not in tests/EQUIVALENT_MUTANTS.md (`mutmut show NAME` for the diff):")
        for name, why in survivors:
            print(f"  {name}  ({why})")
    _worker_time(patterns)
    return 0


def _worker_time(patterns, log=Path("mutants/mutmut-debug.log")):
    """Where the last run's time went: seconds per module, summed over its mutants (log_to_file in pyproject.toml)."""
    if not log.exists():
        return
    seconds, survivors = defaultdict(float), 0.0
    for line in log.read_text(errors="replace").splitlines():
        m = re.search(r"Completed (\S+): exit=(-?\d+) \(([\d.]+)s\)", line)
        if m and selected(m[1], patterns):
            seconds[m[1].split(".x")[0]] += float(m[3])
            survivors += float(m[3]) if m[2] == "0" else 0.0
    if seconds:
        total = sum(seconds.values())
        top = ", ".join(f"{k.removeprefix('minivae.')} {v:.0f}" for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])[:5])
        print(f"\ntime in the mutants' tests, summed over both workers (the last run, {log}): {total:.0f} s, of which "
              f"the mutants that survived {survivors:.0f} s; most: {top}")


def _markdown(per):
    print("| module | mutants run (of listed) | killed (timed out) | equivalent (listed) | survived | score | adjusted |")
    print("|---|---|---|---|---|---|---|")
    tot = defaultdict(int)
    for module, r in sorted(per.items(), key=lambda kv: -(kv[1]["killed"] + kv[1]["survived"] + kv[1]["equivalent"])):
        for k, v in r.items():
            tot[k] += v
        print(_md_row(f"`{module.removeprefix('minivae.')}`", r))
    print(_md_row("**all**", tot, bold=True))
    return 0


def _md_row(name, r, bold=False):
    run = r["killed"] + r["survived"] + r["equivalent"]
    cells = [f"{run:,} ({run + r['not checked']:,})", f"{r['killed']:,} ({r['timeout']})", f"{r['equivalent']}", f"{r['survived']}",
             f"{r['killed'] / run:.1%}" if run else "-",
             f"{r['killed'] / (run - r['equivalent']):.1%}" if run - r["equivalent"] else "-"]
    if bold:
        cells = [f"**{c}**" for c in cells]
    return f"| {name} | " + " | ".join(cells) + " |"


def _line(module, r):
    run = r["killed"] + r["survived"] + r["equivalent"]
    score = r["killed"] / run if run else float("nan")
    adj = r["killed"] / (run - r["equivalent"]) if run - r["equivalent"] else float("nan")
    return (f"{module:34s} {r['killed']:7d} {r['timeout']:6d} {r['survived']:6d} {r['equivalent']:6d} {r['not checked']:6d} "
            f"{score:7.1%} {adj:7.1%}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
