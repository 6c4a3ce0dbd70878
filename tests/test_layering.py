"""Layers point one way: the library never imports the CLI/parity package `convert_weights`, and
nothing in the package imports the trainer or the eval command line (they sit on top)."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "skipclick_jax"


def _imported_modules(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_library_never_imports_convert_weights():
    offenders = sorted(
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in PACKAGE.rglob("*.py")
        for name in _imported_modules(path)
        if name == "convert_weights" or name.startswith("convert_weights.")
    )
    assert not offenders, offenders
    assert any(PACKAGE.rglob("*.py")), "package sources not found"


def _imported_names(path: pathlib.Path):
    """Every module `path` imports, and `package.name` for each `from package import name`."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


# The trainer and the eval command line sit on top of model/, data/, train/ and evaluation/:
# only the top-level train.py / eval.py (and tests) import them.
TOP = ("skipclick_jax.train.trainer", "skipclick_jax.evaluation.cli")


def test_nothing_in_the_package_imports_the_trainer_or_the_eval_cli():
    offenders = sorted(
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in PACKAGE.rglob("*.py")
        for name in _imported_names(path)
        if any(name == top or name.startswith(top + ".") for top in TOP)
    )
    assert not offenders, offenders
    assert all((PACKAGE.parent / (top.replace(".", "/") + ".py")).is_file() for top in TOP)
