"""Build hook: ship the lessons inside the wheel.

The lessons live in ``lessons/`` at the top of the repository, outside the ``minivae`` package.  At build
time this copies ``lessons/*.py`` and ``lessons/*.md`` into the built package as ``minivae/lesson_files/``,
so that an installed minivae can hand them out (``python -m minivae lessons DIR``).  An editable install
or a source checkout reads ``lessons/`` directly (see ``minivae/lessonfiles.py``).  Everything else about
the package is in ``pyproject.toml``.
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class build_py_with_lessons(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return                                   # editable: minivae reads the checkout's lessons/
        src = HERE / "lessons"
        files = sorted(src.glob("*.py")) + sorted(src.glob("*.md"))
        if not files:
            raise SystemExit(f"setup.py: no lessons in {src}; build from a full checkout or sdist")
        dest = Path(self.build_lib) / "minivae" / "lesson_files"
        dest.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copyfile(f, dest / f.name)


setup(cmdclass={"build_py": build_py_with_lessons})
