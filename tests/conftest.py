import json
import os
from pathlib import Path

import numpy as np
import pytest

from minivae.backend import cupy_available

_GPU = cupy_available()
GPU_REASON = "CuPy is not installed or cupy.is_available() is False (no usable CUDA GPU)"


def pytest_collection_modifyitems(config, items):
    _killers_first(items)
    if _GPU:
        return
    skip = pytest.mark.skip(reason=GPU_REASON)
    for item in items:
        # the marker itself, not item.keywords: keywords also hold the names of the folders above the test,
        # so a checkout in a folder named "gpu" would skip every test
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def skip_summary(reports):
    """One line counting skipped tests by reason, e.g. ``35 skipped: 30 no usable GPU (CuPy ...); 5 no jupytext``
    (pytest's -ra would print one line per skipped test; the CuPy and GPU skips alone are dozens)."""
    counts = {}
    for rep in reports:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        reason = reason.removeprefix("Skipped: ") if hasattr(reason, "removeprefix") else reason
        counts[reason] = counts.get(reason, 0) + 1
    if not counts:
        return None
    parts = [f"{n} × {reason}" for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    return f"{sum(counts.values())} skipped: " + "; ".join(parts)


def pytest_terminal_summary(terminalreporter):
    line = skip_summary(terminalreporter.stats.get("skipped", []))
    if line:
        terminalreporter.write_line(line)


# ---- mutation testing (tools/mutation.sh); inert in any other run -----------------------------------------
# Both hooks act only when mutmut has set MUTANT_UNDER_TEST to a mutant's name (mutmut copies this file into
# mutants/tests/).  mutmut runs a mutant's tests fastest first and stops at the first failure (-x).  Most
# mutants of one function fail on the same few tests, which are often not the fastest: a model mutant ran
# 100 quick tests that cannot see it before a gradient check caught it.  So the tests that killed this
# function's mutants in earlier runs (tests/mutation_killers.json, merged by tools/mutation_killers.py from
# mutants/mutation_kills.tsv) run first, and the others keep mutmut's order.  The set of tests is the same,
# so the verdict is the same; only the time to reach it changes.
_HERE = Path(__file__).resolve().parent


def _mutated_function():
    name = os.environ.get("MUTANT_UNDER_TEST", "")
    return name.rsplit("__mutmut_", 1)[0] if "__mutmut_" in name else None


def _killers_first(items):
    function = _mutated_function()
    path = _HERE / "mutation_killers.json"
    if function is None or not path.exists():
        return
    order = [test for test, _count in json.loads(path.read_text()).get(function, [])]
    rank = {test: i for i, test in enumerate(order)}
    items.sort(key=lambda item: rank.get(item.nodeid, len(rank)))    # stable: the rest keep their order


def pytest_runtest_logreport(report):
    """Record the test that killed a mutant: mutants/mutation_kills.tsv, one `mutant<TAB>test` line each."""
    if report.failed and _mutated_function() is not None:
        line = f"{os.environ['MUTANT_UNDER_TEST']}\t{report.nodeid}\n"
        with open(_HERE.parent / "mutation_kills.tsv", "a") as f:     # one short append: whole lines
            f.write(line)


def backends():
    """Parametrize over backends: numpy always, cupy marked gpu (skipped without a GPU)."""
    return [pytest.param("numpy", id="numpy"), pytest.param("cupy", id="cupy", marks=pytest.mark.gpu)]


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
