"""Survivors whose only change is inside a `get_array_module(...)` / `asarray(..., xp)` call (after
tools/mutation.sh): on a machine without a GPU every array is NumPy, so these cannot be told apart there.
Prints their names, for tests/EQUIVALENT_MUTANTS.md.  Usage: python tools/backend_only_survivors.py PATTERN..."""
import re
import subprocess
import sys

CALL = re.compile(r"get_array_module\([^()]*\)|asarray\(src, [^()]*\)")


def main(patterns):
    out = subprocess.run([sys.executable, "tools/mutation_score.py", *patterns], capture_output=True, text=True).stdout
    for name in re.findall(r"^  (minivae\S+)  \(survived\)", out, flags=re.M):
        diff = subprocess.run(["mutmut", "show", name], capture_output=True, text=True).stdout
        minus = [ln[1:] for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---")]
        plus = [ln[1:] for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
        if len(minus) == len(plus) == 1 and CALL.search(minus[0]) and \
                CALL.sub("CALL", minus[0]) == CALL.sub("CALL", plus[0]):
            print(name)


if __name__ == "__main__":
    main(sys.argv[1:])
