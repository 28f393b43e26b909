"""The README's Partial FC example runs as written."""

import pathlib
import re


def test_readme_example_runs(capsys):
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    example = next(b for b in blocks if "PartialFC(" in b)
    exec(compile(example, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "'loss'" in printed and "'invalid_labels': 0.0" in printed
