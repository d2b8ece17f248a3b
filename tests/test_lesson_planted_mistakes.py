"""The lessons' checks can fail: plant a known mistake in a copy of a lesson and the lesson must stop on its check.

Each case replaces one line of a lesson with a plausible wrong version (the substitution must apply exactly once, so
a rewritten lesson makes this test fail loudly instead of passing vacuously), runs the copy in quick mode, and
requires a nonzero exit with the named claim in the ``CHECK failed`` message.

The lessons of the model families (26-31) plant theirs in the library op the lesson checks (a forgotten mask, a
dropped log-det term, ...): ``PLANTED`` in tests/test_families.py, run by ``test_a_lessons_checks_fail_on_a_planted_
mistake`` there; :func:`test_every_family_lesson_has_a_planted_mistake` below keeps that list complete.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    # sigma^2 = exp(2 logvar): logvar read as log sigma instead of log sigma^2, in the closed-form ELBO
    "24-logvar-as-log-sigma": (
        "24_linear_vae_ppca.py",
        "    s2 = np.exp(logvar)                                                        # s_j^2 = e^logvar (logvar = log s^2)",
        "    s2 = np.exp(2 * logvar)",
        "log p(x) - ELBO = KL(q || p(z|x))"),
    # the collapse threshold compared with the decoder's standard deviation sqrt(v) instead of its variance v
    "24-threshold-sqrt-v": (
        "24_linear_vae_ppca.py",
        "k_pred = int((lam[:L] > V_DEC).sum())                                       # the collapse rule's prediction",
        "k_pred = int((lam[:L] > np.sqrt(V_DEC)).sum())",
        "the collapse rule"),
    # z drawn with sigma = exp(logvar) (logvar read as log sigma) in the lesson's own surgery estimator
    "25-sigma-exp-logvar": (
        "25_elbo_surgery.py",
        "    z = mu + np.exp(0.5 * logvar) * eps                                   # z_n ~ q(z | x_n), sigma = e^(logvar/2)",
        "    z = mu + np.exp(logvar) * eps",
        "I + marginal KL = the analytic rate"),
    # the score-function estimator fed classes drawn from the uniform prior p(y) instead of q(y|x)
    "31-reinforce-draws-from-the-prior": (
        "31_semi_supervised_m2.py",
        "    ys = np.array([draws.choice(10, p=row / row.sum()) for row in q])",
        "    ys = draws.integers(0, 10, size=len(q))",
        "REINFORCE is unbiased"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_planted_mistake_fails_the_lessons_check(case, tmp_path):
    name, old, new, claim = CASES[case]
    src = (ROOT / "lessons" / name).read_text(encoding="utf-8")
    assert src.count(old) == 1, f"{name}: the line to corrupt is gone or repeated; update this test: {old!r}"
    mutant = tmp_path / name
    mutant.write_text(src.replace(old, new), encoding="utf-8")
    env = dict(os.environ, MPLBACKEND="Agg", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("MINIVAE_QUICK", None)
    proc = subprocess.run([sys.executable, str(mutant), "--quick", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode != 0, f"{case}: the lesson passed with the planted mistake:\n{proc.stdout[-2000:]}"
    assert f"CHECK failed: {claim}" in proc.stderr, f"{case}: failed elsewhere:\n{proc.stderr[-2000:]}"


FAMILY_LESSONS = ("26", "27", "28", "29", "30", "31")     # the lessons of issue 30's six families


def test_every_family_lesson_has_a_planted_mistake():
    import ast
    tree = ast.parse((ROOT / "tests" / "test_families.py").read_text(encoding="utf-8"))
    planted = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                   and any(getattr(t, "id", None) == "PLANTED" for t in node.targets))
    covered = {name[:2] for name in planted} | {name[:2] for name, *_ in CASES.values()}
    for number in FAMILY_LESSONS:
        (lesson,) = (ROOT / "lessons").glob(f"{number}_*.py")
        assert number in covered, f"{lesson.name} has no planted-mistake test"
