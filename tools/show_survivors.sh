#!/usr/bin/env bash
# The diff of every survivor matching the patterns (after tools/mutation.sh): bash tools/show_survivors.sh "minivae.optim*"
cd "$(dirname "$0")/.."
unset PYTHONPATH
python tools/mutation_score.py "$@" | sed -n 's/^  \(minivae[^ ]*\).*/\1/p' | while read -r name; do
    echo "== $name"
    mutmut show "$name" 2>/dev/null | grep -E '^[-+][^-+]' | head -6
done
