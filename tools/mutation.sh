#!/usr/bin/env bash
# Mutation testing (a development tool; CI never runs it).  Usage, from the repository root:
#
#   bash tools/mutation.sh                 # the functions in tools/mutation_targets.txt (every configured module)
#   bash tools/mutation.sh "minivae.optim*" "minivae.layers*"    # only some modules' mutants
#
# Needs `pip install -e '.[dev]'` (or `pip install -r requirements-dev.txt`).  mutmut keeps its results in
# mutants/ and reruns only mutants of changed functions; `rm -rf mutants` starts afresh.  The summary
# printed at the end is the mutation score per module (killed / (killed + survived)), and the list of
# survivors; `mutmut show NAME` prints one of them as a diff, `bash tools/show_survivors.sh PATTERN` all of them.
# Naming mutants reruns them even if they have a result; to finish an interrupted run without redoing the
# rest:  mapfile -t N < <(python tools/mutation_score.py --unchecked "minivae.model*"); bash tools/mutation.sh "${N[@]}"
set -euo pipefail
cd "$(dirname "$0")/.."
export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 MPLBACKEND=Agg
unset PYTHONPATH               # the tests must import the mutated copy in mutants/, nothing else
if [ $# -eq 0 ]; then             # no arguments: the functions listed in tools/mutation_targets.txt
    mapfile -t targets < <(grep -v '^\s*\(#\|$\)' tools/mutation_targets.txt)
    set -- "${targets[@]}"
fi
# tests/conftest.py runs the tests that killed a function's mutants before (tests/mutation_killers.json) first;
# mutmut copied tests/ into mutants/ when it made the mutants, so give it the newest list
if [ -d mutants/tests ] && [ -f tests/mutation_killers.json ]; then cp tests/mutation_killers.json mutants/tests/; fi
rm -f mutants/mutmut-debug.log*   # the log (log_to_file) then holds this run's time per mutant, for the summary
start=$(date +%s)
mutmut run "$@" || true        # its exit status is not the score; the summary below is
echo "mutmut run: $(( $(date +%s) - start )) s"
python tools/mutation_killers.py    # this run's killers, merged into tests/mutation_killers.json for the next
python tools/mutation_score.py "$@"
