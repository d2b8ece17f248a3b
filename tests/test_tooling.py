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
