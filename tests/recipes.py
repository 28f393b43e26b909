"""The recipes as the tests' in-process code sees them."""

import ast
import pathlib
import runpy

ROOT = pathlib.Path(__file__).parents[1]


def load(name: str, overrides=()):
    """``configs/<name>.py`` with ``--config.<field>=<value>`` flags applied, as ``main``
    would (each value converted to the field's type)."""
    config = runpy.run_path(str(ROOT / "configs" / f"{name}.py"))["get_config"]()
    for flag in overrides:
        key, value = flag.removeprefix("--config.").split("=")
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        kind = type(node[leaf])
        node[leaf] = tuple(ast.literal_eval(value)) if kind is tuple else kind(value)
    return config
