"""Course assignments: generate a student copy from the reference, and grade it.

    python -m minivae.assignments make OUT_DIR [--exercises ID,ID,...]
    python -m minivae.assignments grade DIR [--json FILE] [--timeout S]
    python -m minivae.assignments list

The exercises are the regions of the reference code marked
``### BEGIN SOLUTION <id>`` / ``### END SOLUTION`` (see :mod:`.exercises`
for the table).  ``make`` replaces the selected regions by stubs that raise
``NotImplementedError`` with a hint; ``grade`` runs each exercise's checks in
an isolated, time-limited subprocess against the grader's own harness
(:mod:`.harness`) and reference formulas (:mod:`.reference`).
"""
from .exercises import BY_ID, EXERCISES, IDS, Exercise, select
from .grading import grade, grade_batch, grade_one
from .make import make_starter
from .markers import MarkerError, find_regions, stub_text

__all__ = ["EXERCISES", "BY_ID", "IDS", "Exercise", "select", "grade", "grade_batch", "grade_one", "make_starter",
           "MarkerError", "find_regions", "stub_text"]
