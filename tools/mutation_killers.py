"""Merge the tests that killed mutants (mutants/mutation_kills.tsv) into tests/mutation_killers.json.

tools/mutation.sh runs this after every mutmut run.  tests/conftest.py records, for each killed mutant, the test
that failed; this script counts them per mutated function, adds the counts to those already in the JSON file, and
stores each function's killers in the order its mutants' tests should run next time:

    cost of trying a test first ~ its duration / how often it kills (Smith's rule: cheapest per kill first)

The durations come from mutmut's own measurement (mutants/mutmut-stats.json).  At most KEEP tests per function
are kept.  The order never changes which tests a mutant runs, only how soon a killing one comes.

    python tools/mutation_killers.py            # merge, then delete the .tsv (its counts are in the JSON now)
"""
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

KEEP = 12
KILLS = Path("mutants/mutation_kills.tsv")
STATS = Path("mutants/mutmut-stats.json")
KILLERS = Path("tests/mutation_killers.json")


def merge(kills_text, old, duration):
    """New ``{function: [[test, count], ...]}`` from the old one and the ``mutant<TAB>test`` lines."""
    counts = defaultdict(Counter)
    for function, pairs in old.items():
        for test, count in pairs:
            counts[function][test] += count
    first = {}                                     # a mutant's first failure is its killer (-x: usually the only one)
    for line in kills_text.splitlines():
        mutant, _, test = line.partition("\t")
        if "__mutmut_" in mutant and test:
            first.setdefault(mutant, test)
    for mutant, test in first.items():
        counts[mutant.rsplit("__mutmut_", 1)[0]][test] += 1

    def cost(item):
        test, count = item
        return (duration.get(test, 1.0) + 1e-3) / count, test

    return {f: [[t, c] for t, c in sorted(c.items(), key=cost)[:KEEP]] for f, c in sorted(counts.items())}


def main():
    if not KILLS.exists():
        print("mutation_killers: no new kills recorded")
        return 0
    old = json.loads(KILLERS.read_text()) if KILLERS.exists() else {}
    duration = json.loads(STATS.read_text())["duration_by_test"] if STATS.exists() else {}
    text = KILLS.read_text()
    new = merge(text, old, duration)
    lines = [f" {json.dumps(f, ensure_ascii=False)}: {json.dumps(pairs)}" for f, pairs in new.items()]
    KILLERS.write_text("{\n" + ",\n".join(lines) + "\n}\n")                 # a function a line: short diffs
    KILLS.unlink()
    print(f"mutation_killers: {len(text.splitlines())} kills merged into {KILLERS} ({len(new)} functions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
