"""The README's Python snippets, run unchanged the ways people run code: a plain script without an
``if __name__ == "__main__":`` guard, code read from stdin (``python - < script.py``) and inside a daemonic
``multiprocessing.Pool`` worker (issue 24: decode workers re-imported the caller's ``__main__``, so the script
ran again in every worker, stdin failed with ``FileNotFoundError: '<stdin>'`` and a daemonic worker could not
start them at all).

Each snippet runs in a folder laid out as the README names its paths (``data/animal_mnist``,
``data/held_out/``, ``new_photos/``, ``work/``), filled with a few tiny real photographs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.helpers import make_image_tree

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

#: runs code from argv[1] in a daemonic pool worker, as a user's own multiprocessing job would
POOL_RUNNER = """
import multiprocessing, sys
code = open(sys.argv[1]).read()
def job(code):
    assert multiprocessing.current_process().daemon
    exec(compile(code, "snippet.py", "exec"), {"__name__": "snippet"})
    return "done"
if __name__ == "__main__":
    with multiprocessing.Pool(1) as pool:
        print(pool.apply(job, (code,)))
"""


def readme_snippet(first_line: str) -> str:
    """The README's ```python block that starts with ``first_line``."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    found = [b for b in blocks if b.startswith(first_line)]
    assert found, f"README.md has no python block starting with {first_line!r}"
    return found[0]


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    """A working folder with the README's paths: a labelled tree, held-out labelled images, new photos."""
    root = tmp_path_factory.mktemp("readme")
    make_image_tree(root / "data" / "animal_mnist", per_class=6, size=40)
    make_image_tree(root / "data" / "held_out", per_class=2, size=44)
    flat = make_image_tree(root / "tmp_new", per_class=1, size=36)
    (root / "new_photos").mkdir()
    for p in sorted(flat.rglob("*.jpg")):
        p.rename(root / "new_photos" / p.name)
    return root


def _run(how: str, code: str, cwd: Path) -> subprocess.CompletedProcess:
    script = cwd / "snippet.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if how == "script":
        args, stdin = [sys.executable, str(script)], None
    elif how == "stdin":
        args, stdin = [sys.executable, "-"], script.open()
    else:
        (cwd / "pool_runner.py").write_text(POOL_RUNNER)
        args, stdin = [sys.executable, str(cwd / "pool_runner.py"), str(script)], None
    try:
        return subprocess.run(args, cwd=cwd, stdin=stdin, capture_output=True, text=True, env=env, timeout=500)
    finally:
        if stdin is not None:
            stdin.close()


@pytest.mark.parametrize("how", ["script", "stdin", "daemonic-pool"])
def test_the_readme_snippets_run_as_written(place, how, tmp_path):
    """The "Everything is also a Python function" snippet, then the notebook one, as one unguarded script."""
    code = readme_snippet("from stage1_extract import extract\nsummary = extract(") + "\n" + \
        readme_snippet("from stage1_extract import extract\nfrom stage2_classify import Classifier, train")
    code += "\nprint('PREDICTED', len(df), df['predicted'].notna().sum())\n"
    work = tmp_path / how
    work.mkdir()
    for name in ("data", "new_photos"):
        (work / name).symlink_to(place / name)
    r = _run(how, code, work)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "extracted 18 " in r.stdout, r.stdout + r.stderr[-2000:]  # the first snippet's summary
    assert "PREDICTED 3 3" in r.stdout, r.stdout + r.stderr[-2000:]
    assert r.stdout.count("PREDICTED") == 1  # the script ran once, not again in a worker
    assert len(list((work / "work" / "features" / "efficientnet_lite0").glob("part-*.parquet"))) >= 1
    assert (work / "work" / "runs" / "first" / "run.json").is_file()
    assert "decoding in this process" not in r.stderr  # real worker processes, even from a daemonic worker
