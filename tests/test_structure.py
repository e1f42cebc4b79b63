"""The package's structure: imports point one way, every module has its
test file, and modules and classes stay short enough to read (see
docs/architecture.md)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "keras_muon"
TESTS = Path(__file__).resolve().parent

# The modules from the bottom up: each may import only modules above it in
# this list (lazy imports inside functions included). A new module takes
# its place here.
LAYERS = [
    # Small helpers that know nothing of the optimizer.
    "arguments",
    "naming",
    "report",
    "registry",
    # The arithmetic.
    "update.newton_schulz",
    "update.rule",
    "update.momentum_storage",
    "update.state",
    "update.batching",
    "update.parts",
    # Which variables are matrices, and how they are read.
    "routing.views",
    "routing.keras_layers",
    "routing.fused",
    "routing.keras_hub",
    "routing.heads",
    "routing.route",
    # Speed and scale.
    "backends.distributed",
    "backends.torch_foreach",
    "backends.tf_distribute",
    # An optional feature.
    "qk_clip.rules",
    "qk_clip.keras_hub",
    "qk_clip.probe",
    "qk_clip.clip",
    # Persistence, then the optimizers and the public names.
    "checkpoint",
    "muon",
    "normuon",
    "adamuon",
    # Watching a run.
    "monitor.statistics",
    "monitor.callback",
    "__init__",
]
MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 300


def module_name(path):
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__" and len(parts) > 1:
        return ".".join(parts[:-1]) + ".__init__"
    return ".".join(parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
# A sub-package's `__init__` holds its docstring only.
SUBPACKAGES = {name for name in MODULES if name.endswith(".__init__")}


def imports_of(path):
    """The package's modules that the module at `path` imports, anywhere
    in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        module = isinstance(node, ast.ImportFrom) and node.module
        if module and module.startswith("keras_muon"):
            base = node.module.removeprefix("keras_muon").lstrip(".")
            for alias in node.names:
                name = f"{base}.{alias.name}".lstrip(".")
                found.add(name if name in MODULES else base or "__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("keras_muon."):
                    found.add(alias.name.removeprefix("keras_muon."))
    return found


def test_every_module_has_its_place_in_the_layers():
    assert sorted(set(MODULES) - SUBPACKAGES) == sorted(LAYERS)


def test_sub_packages_import_nothing():
    for name in SUBPACKAGES:
        assert imports_of(MODULES[name]) == set(), name


@pytest.mark.parametrize("module", LAYERS)
def test_imports_point_down_the_layers(module):
    below = set(LAYERS[: LAYERS.index(module)])
    assert imports_of(MODULES[module]) <= below, imports_of(MODULES[module]) - below


@pytest.mark.parametrize("module", [m for m in LAYERS if m != "__init__"])
def test_every_module_has_a_test_file(module):
    *folders, name = module.split(".")
    assert TESTS.joinpath(*folders, f"test_{name}.py").exists()


def test_modules_and_classes_are_short_enough_to_read():
    for name, path in MODULES.items():
        source = path.read_text()
        assert len(source.splitlines()) <= MAX_MODULE_LINES, name
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef):
                length = node.end_lineno - node.lineno + 1
                assert length <= MAX_CLASS_LINES, (name, node.name, length)


def test_the_check_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "lazy.py"
    module.write_text(
        "def f():\n    from keras_muon.backends import torch_foreach\n"
        "    from keras_muon import muon\n    import keras_muon.routing.views\n"
    )
    assert imports_of(module) == {"backends.torch_foreach", "muon", "routing.views"}
