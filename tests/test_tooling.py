"""The development tooling stays out of the way: mutation testing is a dev tool, configured but never run by CI."""
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pyproject():
    if sys.version_info < (3, 11):
        pytest.skip("tomllib needs Python 3.11")
    import tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_mutmut_is_a_dev_tool_only(pyproject):
    assert not any("mutmut" in d for d in pyproject["project"]["dependencies"])
    assert any(d.startswith("mutmut") for d in pyproject["project"]["optional-dependencies"]["dev"])
    assert "mutmut" not in (ROOT / "requirements.txt").read_text()
    assert "mutmut" in (ROOT / "requirements-dev.txt").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "mutmut" not in ci and "mutation" not in ci


def test_mutation_config_points_at_real_files(pyproject):
    cfg = pyproject["tool"]["mutmut"]
    for pattern in cfg["only_mutate"]:
        assert list(ROOT.glob(pattern)), pattern
    tests = [a for a in cfg["pytest_add_cli_args_test_selection"] if a.startswith("tests/")]
    for t in tests:
        assert (ROOT / t.split("::")[0]).exists(), t
    # slow or subprocess-based tests cannot see a mutant (or take minutes): never selected
    assert not {"tests/test_lessons.py", "tests/test_notebooks.py", "tests/test_cli.py"} & set(tests)


def test_equivalent_mutants_are_named_as_mutmut_names_them():
    text = (ROOT / "tests" / "EQUIVALENT_MUTANTS.md").read_text()
    names = re.findall(r"`(minivae\.[^`]*__mutmut_\d+)`", text)
    assert names and len(names) == len(set(names))
    for name in names:
        module = name.split(".x")[0]                      # minivae.optim.x_fn__mutmut_3 -> minivae.optim
        assert (ROOT / (module.replace(".", "/") + ".py")).exists(), name


# ---- killers first: tests/conftest.py and tools/mutation_killers.py ----------------------------------------
def _tool(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_killers_merge_counts_a_mutants_first_failure_and_orders_by_time_per_kill():
    merge = _tool("mutation_killers").merge
    kills = ("m.x_f__mutmut_1\tt_fast\n"
             "m.x_f__mutmut_1\tt_other\n"          # a second failure of the same mutant: not its killer
             "m.x_f__mutmut_2\tt_fast\n"
             "m.x_g__mutmut_1\tt_slow\n"
             "stats\tt_other\n")                   # mutmut's own runs are not mutants
    duration = {"t_fast": 0.01, "t_slow": 1.0, "t_other": 0.001}
    old = {"m.x_f": [["t_slow", 3]], "m.x_h": [["t_other", 1]]}
    new = merge(kills, old, duration)
    assert new == {"m.x_f": [["t_fast", 2], ["t_slow", 3]], "m.x_g": [["t_slow", 1]], "m.x_h": [["t_other", 1]]}
    # cheapest per kill first: a slow test that kills 50 times beats a fast one that killed once
    assert merge("", {"m.x_f": [["t_fast", 1], ["t_slow", 500]]}, duration)["m.x_f"][0] == ["t_slow", 500]


def test_killers_merge_keeps_the_cheapest_few_per_function():
    mk = _tool("mutation_killers")
    kills = "".join(f"m.x_f__mutmut_{i}\tt{i}\n" for i in range(mk.KEEP + 5))
    duration = {f"t{i}": float(i) for i in range(mk.KEEP + 5)}
    assert mk.merge(kills, {}, duration)["m.x_f"] == [[f"t{i}", 1] for i in range(mk.KEEP)]


def test_killers_run_first_only_for_a_mutant_and_the_rest_keep_their_order(monkeypatch, tmp_path):
    import json
    from types import SimpleNamespace

    import conftest
    (tmp_path / "mutation_killers.json").write_text(json.dumps({"minivae.m.x_f": [["c", 4], ["b", 1], ["gone", 9]]}))
    monkeypatch.setattr(conftest, "_HERE", tmp_path)

    def order(mutant):
        if mutant is None:
            monkeypatch.delenv("MUTANT_UNDER_TEST", raising=False)
        else:
            monkeypatch.setenv("MUTANT_UNDER_TEST", mutant)
        items = [SimpleNamespace(nodeid=n) for n in "abcd"]
        conftest._killers_first(items)
        return "".join(i.nodeid for i in items)

    assert order(None) == "abcd"                           # an ordinary test run
    assert order("stats") == "abcd"                        # mutmut's clean and stats runs
    assert order("minivae.m.x_g__mutmut_2") == "abcd"      # a function with no recorded killers
    assert order("minivae.m.x_f__mutmut_7") == "cbad"


def test_a_failure_is_recorded_only_under_a_mutant(monkeypatch, tmp_path):
    from types import SimpleNamespace

    import conftest
    monkeypatch.setattr(conftest, "_HERE", tmp_path / "tests")
    kills = tmp_path / "mutation_kills.tsv"
    monkeypatch.delenv("MUTANT_UNDER_TEST", raising=False)
    conftest.pytest_runtest_logreport(SimpleNamespace(failed=True, nodeid="tests/t.py::a"))
    assert not kills.exists()
    monkeypatch.setenv("MUTANT_UNDER_TEST", "minivae.m.x_f__mutmut_3")
    conftest.pytest_runtest_logreport(SimpleNamespace(failed=False, nodeid="tests/t.py::a"))
    conftest.pytest_runtest_logreport(SimpleNamespace(failed=True, nodeid="tests/t.py::b"))
    assert kills.read_text() == "minivae.m.x_f__mutmut_3\ttests/t.py::b\n"


def test_the_recorded_killers_are_tests_of_the_mutation_selection(pyproject):
    import json
    path = ROOT / "tests" / "mutation_killers.json"
    killers = json.loads(path.read_text())
    selected = {a for a in pyproject["tool"]["mutmut"]["pytest_add_cli_args_test_selection"] if a.startswith("tests/")}
    assert len(killers) > 100
    for function, pairs in killers.items():
        assert re.fullmatch(r"minivae\.[\w.ǁ]+", function), function
        assert pairs and all(count >= 1 for _, count in pairs), function
        assert {test.split("::")[0] for test, _ in pairs} <= selected, function


def test_skips_are_counted_in_one_line_by_reason():
    from types import SimpleNamespace

    from conftest import skip_summary
    gpu = SimpleNamespace(longrepr=("t.py", 1, "Skipped: no usable GPU"))
    jup = SimpleNamespace(longrepr=("t.py", 2, "jupytext is a test dependency"))
    assert skip_summary([gpu, jup, gpu]) == "3 skipped: 2 × no usable GPU; 1 × jupytext is a test dependency"
    assert skip_summary([]) is None
    assert "-ra" not in (ROOT / "pyproject.toml").read_text().split("addopts")[1].splitlines()[0]
