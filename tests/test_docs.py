"""The README and docs/ say what is true: their snippets run as written, their links lead somewhere, their
commands parse, and the install text matches what pip installs."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
USER_DOCS = [README] + DOCS

FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.S | re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def blocks(path, lang):
    """The fenced code blocks of ``path`` in language ``lang``, dedented."""
    out = []
    for indent, kind, body in FENCE.findall(path.read_text(encoding="utf-8")):
        if kind == lang:
            out.append("\n".join(line[len(indent):] for line in body.splitlines()) + "\n")
    return out


def shell_commands(text):
    """Every shell command of a bash block: one per line or per ``&&``, the comment dropped."""
    cmds = []
    for line in text.splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith("#"):
            cmds += [c.strip() for c in line.split("&&")]
    return cmds


def minivae_commands(path):
    """The arguments of every ``python -m minivae ...`` command of ``path``, in code blocks and inline code."""
    text = path.read_text(encoding="utf-8")
    found = []
    for block in blocks(path, "bash"):
        found += shell_commands(block)
    found += re.findall(r"`([^`\n]*python -m minivae [^`\n]*)`", text)
    args = []
    for cmd in found:
        m = re.search(r"python -m minivae (.*)", cmd)
        if m and not m.group(1).startswith(".") and not m.group(1).split()[0].isupper():
            # (python -m minivae.assignments is another entry point; COMMAND is a placeholder)
            args.append(m.group(1).split(" #")[0].replace("\\|", "|"))
    return args


def test_the_readme_is_short_and_starts_with_the_two_commands():
    text = README.read_text(encoding="utf-8")
    n = len(text.splitlines())
    assert 120 <= n <= 220, f"the README is {n} lines; it should stay about 150-200 (details go to docs/)"
    first = shell_commands(blocks(README, "bash")[0])
    assert first[:2] == ["pip install -e .", "python -m minivae train"]
    assert first[2:] == ["pip install -r requirements-test.txt", "python -m pytest"]


def test_ci_runs_exactly_the_readmes_test_command():
    line = blocks(README, "bash")[0].splitlines()[1].split(" #")[0].strip()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert line in ci, f".ci/run does not run the README's test command {line!r}"
    assert "python -m pip install --quiet -e ." in ci


@pytest.mark.parametrize("path", USER_DOCS, ids=lambda p: p.name)
def test_links_lead_to_files_that_exist(path):
    for target in LINK.findall(path.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        file = (path.parent / target.split("#")[0]).resolve()
        assert file.exists(), f"{path.name} links to {target}, which does not exist"


def test_paths_the_readme_names_exist():
    text = README.read_text(encoding="utf-8")
    for name in set(re.findall(r"`((?:lessons|docs|benchmarks|tests|minivae)/[\w./-]+)`", text)):
        assert (ROOT / name).exists(), f"the README names {name}, which does not exist"
    for name in ("requirements.txt", "requirements-test.txt", "LICENSE"):
        assert name in text and (ROOT / name).exists()


@pytest.mark.parametrize("path", USER_DOCS, ids=lambda p: p.name)
def test_every_minivae_command_in_the_docs_parses(path):
    from minivae.cli import build_parser
    parser = build_parser()
    for args in minivae_commands(path):
        argv = shlex.split(args)
        try:
            parser.parse_args(argv)
        except SystemExit as exc:
            if exc.code:
                pytest.fail(f"{path.name}: `python -m minivae {args}` does not parse")


def test_the_readmes_python_snippets_run_as_written(tmp_path):
    snippets = blocks(README, "python")
    assert snippets, "the README shows how to use the library from Python"
    for code in snippets:
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"a README snippet fails:\n{code}\n{r.stderr[-2000:]}"


def test_the_library_docs_python_snippets_run_as_written(tmp_path):
    for code in blocks(ROOT / "docs" / "library.md", "python"):
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           env={**__import__("os").environ, "OPENBLAS_NUM_THREADS": "1"})
        assert r.returncode == 0, f"a docs/library.md snippet fails:\n{code}\n{r.stderr[-2000:]}"


def test_the_lessons_command_of_the_readme_writes_notebooks(tmp_path):
    from minivae.cli import main
    assert "python -m minivae lessons my-lessons" in README.read_text(encoding="utf-8")
    assert main(["lessons", str(tmp_path / "my-lessons")]) == 0
    assert sorted(tmp_path.joinpath("my-lessons").glob("01_*.ipynb"))


def requirement_lines(name):
    return [line.strip() for line in (ROOT / name).read_text().splitlines()
            if line.strip() and not line.startswith(("#", "-r"))]


def test_the_install_text_matches_the_package():
    if sys.version_info < (3, 11):
        pytest.skip("tomllib needs Python 3.11")
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert requirement_lines("requirements.txt") == project["dependencies"], \
        "requirements.txt lists what minivae needs to run, as pyproject.toml's dependencies do"
    assert requirement_lines("requirements-test.txt") == project["optional-dependencies"]["test"]
    text = README.read_text(encoding="utf-8")
    for extra in re.findall(r"pip install -e '\.\[(\w+)\]'", text):
        assert extra in project["optional-dependencies"], f"the README shows an extra [{extra}] that does not exist"
    for path in USER_DOCS:
        hit = re.search(r"pip install [\"']?minivae\b", path.read_text(encoding="utf-8"))
        assert hit is None, f"{path.name}: {hit.group(0)!r}: minivae is not on an index; from a clone: -e '.[...]'"


@pytest.mark.parametrize("path", USER_DOCS + [ROOT / "lessons" / "README.md"], ids=lambda p: str(p.relative_to(ROOT)))
def test_user_docs_hold_no_clock_times_or_load(path):
    text = path.read_text(encoding="utf-8")
    for pattern in (r"\b\d\d:\d\d(-\d\d:\d\d)? UTC", r"load average", r"busy (shared )?machine", r"\b20\d\d-\d\d-\d\d\b"):
        hit = re.search(pattern, text)
        assert hit is None, f"{path.name}: {hit.group(0)!r}: user docs carry results, not when or under what load"


def test_the_readmes_results_are_those_of_docs_results():
    """One number per result, one place: every result the README quotes (a number like 102.3, 86.37, 96.4) is a
    number of docs/results.md, as written there or rounded to the README's digits."""
    def numbers(text):
        return re.findall(r"(?<![\d.])(\d{2,3})\.(\d+)(?![\d.])", text)      # 2-3 digits: not a version (3.9)
    results = [float(f"{a}.{b}") for a, b in numbers((ROOT / "docs" / "results.md").read_text(encoding="utf-8"))]
    quoted = numbers(README.read_text(encoding="utf-8"))
    assert len(quoted) >= 4, "the README quotes the main results"
    for a, b in quoted:
        x = float(f"{a}.{b}")
        assert any(round(r, len(b)) == x for r in results), \
            f"the README quotes {a}.{b}, which is no number of docs/results.md (rounded to {len(b)} decimals)"


def test_an_exported_lesson_reads_right_where_it_stands(tmp_path):
    """In the folder `python -m minivae lessons DIR` writes, the lessons lie side by side: every
    `python NN_name.py` and every lesson file the texts name is there, and no text sends the reader to lessons/."""
    import json

    from minivae.lessonfiles import export_lessons
    dest = tmp_path / "my-lessons"
    export_lessons(dest)
    names = {p.name for p in dest.iterdir()}
    for path in sorted(dest.iterdir()):
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".ipynb":
            text = "".join("".join(cell["source"]) for cell in json.loads(text)["cells"])
        for script in re.findall(r"python ([\w./-]+\.py)", text):
            assert script in names, f"{path.name} says to run {script}, which is not in the exported folder"
        for ref in re.findall(r"(?<![\w/.])lessons/(\d\d_\w+\.py|[A-Z]+\.md)", text):
            pytest.fail(f"{path.name} names lessons/{ref}; in the exported folder it is {ref}")


def test_the_exported_docs_say_how_to_install_and_run_from_where_they_land(tmp_path):
    """The exported folder is not the repository: its README does not say "pip install -e ., from the repository
    root" as if it were; it says where minivae comes from (a clone, or the Python that exported the folder) and
    runs the lessons from this folder, which works; the repository's tests are named as the repository's."""
    from minivae.lessonfiles import DOC_REWRITES, export_lessons
    for name, rewrites in DOC_REWRITES.items():          # each rewrite still finds its sentence in lessons/
        source = (ROOT / "lessons" / name).read_text(encoding="utf-8")
        for old, _ in rewrites:
            assert old in source, f"lessons/{name} no longer holds {old!r}: update minivae.lessonfiles.DOC_REWRITES"
    dest = tmp_path / "my-lessons"
    export_lessons(dest)
    for doc in sorted(dest.glob("*.md")):
        text = doc.read_text(encoding="utf-8")
        assert "repository root" not in text, f"{doc.name}: the exported folder is not the repository"
        for sentence in re.split(r"(?<=[.;:])\s+(?=[A-Z(#])|\n#", text):
            if "pip install -e ." in sentence:
                assert "clone" in sentence, f"{doc.name}: {sentence!r}: pip install -e . from where?"
            if re.search(r"(?<![\w/])tests/", sentence):
                assert "repository" in sentence or "clone" in sentence, f"{doc.name}: {sentence!r}: whose tests/?"
    block = re.search(r"```bash\n(.*?)```", (dest / "README.md").read_text(encoding="utf-8"), re.S).group(1)
    assert "python -m minivae" in block and "from this folder" in block
    script = re.search(r"^python (\d\d_\w+\.py)", block, re.M).group(1)
    r = subprocess.run([sys.executable, script, "--quick"], cwd=dest, capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "OPENBLAS_NUM_THREADS": "1", "MPLBACKEND": "Agg"})
    assert r.returncode == 0 and "CHECK passed" in r.stdout, r.stderr[-2000:]
    assert any((dest / "lesson_output" / script[:-3]).iterdir()), "its figures go under lesson_output/ here"


def test_the_readme_lists_every_lesson():
    text = README.read_text(encoding="utf-8")
    for lesson in sorted((ROOT / "lessons").glob("[0-9][0-9]_*.py")):
        assert f"](lessons/{lesson.name})" in text, f"the README's lessons table has no line for {lesson.name}"


def test_the_cli_reference_names_every_option():
    import argparse

    from minivae.cli import build_parser
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {opt}" for name, p in sub.choices.items() for a in p._actions for opt in a.option_strings
               if opt.startswith("--") and opt != "--help" and opt not in text]
    assert not missing, f"docs/cli.md does not mention {missing}"
