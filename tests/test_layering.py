"""Layers point one way: the library never imports the CLI/parity package `convert_weights`,
nothing in the package imports the trainer or the eval command line (they sit on top), and each
layer of `LAYERS` imports only from itself and the layers below it."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "skipclick_jax"


def _imported_names(path: pathlib.Path):
    """Every module `path` imports, and `package.name` for each `from package import name`."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_library_never_imports_convert_weights():
    offenders = sorted(
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in PACKAGE.rglob("*.py")
        for name in _imported_names(path)
        if name == "convert_weights" or name.startswith("convert_weights.")
    )
    assert not offenders, offenders
    assert any(PACKAGE.rglob("*.py")), "package sources not found"


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



# Which layer may import which: a module imports only modules of its own group, of a group of a
# lower layer, or (where the layer allows peers) of another group of its own layer. A module
# belongs to the group with the longest matching prefix (train.trainer is an application).
LAYERS = (  # (layer, peers may import each other, groups)
    ("core", True, ("atomic", "defaults", "resize", "edt", "clicks", "metrics", "images", "runtime",
                    "distributed", "visualize", "storage")),
    ("library", True, ("config_lib", "model", "data", "weights", "checkpoint")),
    ("engines", False, ("train", "evaluation")),
    ("applications", True, ("train.trainer", "evaluation.cli", "predictor", "export", "app", "demo",
                            "annotation", "seal", "data.upload", "__init__")),
)


def _module_name(package: pathlib.Path, path: pathlib.Path) -> str:
    """'train/step.py' -> 'train.step'; a package's __init__.py -> its name ('' -> '__init__')."""
    parts = path.relative_to(package).with_suffix("").parts
    return ".".join(parts[:-1]) or "__init__" if parts[-1] == "__init__" else ".".join(parts)


def _group(module: str) -> tuple[int, str]:
    """(layer index, group) of a module name relative to the package (e.g. 'train.step')."""
    matches = [(len(group), rank, group) for rank, (_, _, groups) in enumerate(LAYERS)
               for group in groups if module == group or module.startswith(group + ".")]
    assert matches, f"skipclick_jax.{module} is in no layer of LAYERS"
    return max(matches)[1:]


def _layer_offenders(package: pathlib.Path) -> list[str]:
    """Every import in `package` that goes up a layer, or sideways where peers may not."""
    modules = {_module_name(package, p) for p in package.rglob("*.py")}
    offenders = []
    for path in package.rglob("*.py"):
        module = _module_name(package, path)
        rank, group = _group(module)
        deps = set()
        for name in _imported_names(path):  # 'from skipclick_jax import x' names module x
            if name.startswith("skipclick_jax."):
                name = name.removeprefix("skipclick_jax.")
                while name not in modules and "." in name:
                    name = name.rsplit(".", 1)[0]
                deps |= {name} & modules
        for dep in sorted(deps):
            dep_rank, dep_group = _group(dep)
            if dep_group == group or dep_rank < rank or (dep_rank == rank and LAYERS[rank][1]):
                continue
            offenders.append(f"{module} ({LAYERS[rank][0]}: {group}) imports {dep} "
                             f"({LAYERS[dep_rank][0]}: {dep_group})")
    return sorted(offenders)


def test_layers_import_only_downwards():
    offenders = _layer_offenders(PACKAGE)
    assert not offenders, "\n".join(offenders)


def test_layering_check_catches_upward_and_sideways_imports(tmp_path):
    package = tmp_path / "skipclick_jax"
    files = {
        "__init__.py": "from skipclick_jax.predictor import Predictor\n",
        "predictor.py": "", "train/__init__.py": "", "evaluation/__init__.py": "",
        "train/step.py": "from skipclick_jax.evaluation import protocol\n",
        "evaluation/protocol.py": "",
        "config_lib.py": "from skipclick_jax.train.step import make_train_step\n",
        "data/__init__.py": "import skipclick_jax.train\nfrom skipclick_jax import config_lib\n",
    }
    for rel, text in files.items():
        (package / rel).parent.mkdir(parents=True, exist_ok=True)
        (package / rel).write_text(text)
    assert _layer_offenders(package) == [
        "config_lib (library: config_lib) imports train.step (engines: train)",
        "data (library: data) imports train (engines: train)",
        "train.step (engines: train) imports evaluation (engines: evaluation)",
        "train.step (engines: train) imports evaluation.protocol (engines: evaluation)",
    ]
