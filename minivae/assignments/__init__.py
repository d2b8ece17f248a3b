"""Course assignments: generate a student copy from the reference, and grade submissions.

    python -m minivae.assignments make OUT_DIR [--exercises ID,ID,...] [--hide-derivations]
    python -m minivae.assignments grade SUBMISSION... [--jobs N] [--out DIR | --json FILE] [--manifest F] [--seed S]
    python -m minivae.assignments list

The exercises are the regions of the reference code marked
``### BEGIN SOLUTION <id>`` / ``### END SOLUTION`` (see :mod:`.exercises`
for the table).  ``make`` replaces the selected regions by stubs that raise
``NotImplementedError`` with a hint and keeps a manifest of hashes beside the
copy.  ``grade`` rebuilds each graded copy from the pristine starter and the
submission's region bodies, runs each exercise's student code in an isolated
child (:mod:`.sandbox`, :mod:`.runner`) and judges the returned arrays in the
parent (:mod:`.checks`, with the grader's own :mod:`.reference` ops).
"""
from .exercises import BY_ID, EXERCISES, IDS, Exercise, select
from .grading import grade, grade_batch, grade_one
from .make import make_starter
from .markers import MarkerError, find_regions, stub_text

__all__ = ["EXERCISES", "BY_ID", "IDS", "Exercise", "select", "grade", "grade_batch", "grade_one", "make_starter",
           "MarkerError", "find_regions", "stub_text"]
