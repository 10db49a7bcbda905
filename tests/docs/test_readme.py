"""The README's promises: its Python example runs, and CI runs its test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_public_api_example_runs():
    code = re.search(r"## Public API\n\n```python\n(.*?)```", README, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 — our own documentation
    assert scope["loss"].item() > 0


def test_ci_runs_the_readme_test_command():
    quick = README[README.index("## Quick start") :]
    test_cmd = re.search(r"# 2\. run the tests\n(.+)\n", quick).group(1).strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines()
