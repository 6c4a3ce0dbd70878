"""Layers point one way: the library never imports the CLI/parity package `convert_weights`."""

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
