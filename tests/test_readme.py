"""The README's Python example runs as written."""

import pathlib
import re


def test_readme_example_runs(capsys):
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    exec(compile(example, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "'loss'" in printed and "'invalid_labels': 0.0" in printed
