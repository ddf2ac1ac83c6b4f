"""The package's layout holds its promises: methods are folders, Lightning stays in training.

These read the source (AST) rather than trusting a list kept by hand, so a new
module that breaks a rule fails here.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import tipr
from tipr.methods import METHODS

PACKAGE = Path(tipr.__file__).parent
LIGHTNING_ALLOWED = ("training/", "cli.py")
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module in the package."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names of everything ``path`` imports, at any depth (function-local imports included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


MODULES = _modules()
IMPORTS = {name: _imports(name, path) for name, path in MODULES.items()}


def _relative(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def test_lightning_is_imported_only_by_the_training_package_and_the_cli():
    offenders = sorted(
        f"{_relative(path)} imports {sorted(i for i in IMPORTS[name] if i.split('.')[0] in ('lightning', 'pytorch_lightning'))}"
        for name, path in MODULES.items()
        if any(i.split(".")[0] in ("lightning", "pytorch_lightning") for i in IMPORTS[name])
        and not _relative(path).startswith(LIGHTNING_ALLOWED)
    )
    assert offenders == []


def test_shared_code_names_no_method():
    """Only a method's own folder imports it; everything else goes through the registry."""
    offenders = []
    for name, path in MODULES.items():
        owner = name.split(".")[2] if name.startswith("tipr.methods.") else None
        for method in METHODS:
            target = f"tipr.methods.{method}"
            if owner == method:
                continue
            if any(i == target or i.startswith(target + ".") for i in IMPORTS[name]):
                offenders.append(f"{_relative(path)} imports {target}")
    # The registry's table names each method's package as a string, not an import.
    assert offenders == []


def test_the_registry_lists_every_method_folder():
    folders = {p.name for p in (PACKAGE / "methods").iterdir() if (p / "__init__.py").is_file()}
    assert folders == set(METHODS)


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every cycle a depth-first walk of ``graph`` closes, as ``a -> b -> a``."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    cycles = []

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return cycles


def test_no_import_cycles_between_modules():
    """Function-local imports count too: a cycle hidden in a function is still a cycle.

    (The registry loads a method's package by name, ``importlib.import_module``,
    which is how ``tipr.model`` finds a method without importing one.)
    """
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a -> b -> c -> a"]
    graph = {}
    for name in MODULES:
        # A module importing its own package (``tipr.model.base`` -> ``tipr.model``) is the
        # package's __init__ re-exporting it, not a cycle.
        graph[name] = {t for t in IMPORTS[name] if t in MODULES and t != name and not name.startswith(t + ".")}
    assert _cycles(graph) == []


def test_no_module_is_over_about_400_lines():
    long = {_relative(p): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_from_pretrained_loads_no_lightning(tmp_path, method):
    from tipr.methods import method_spec

    spec = method_spec(method)
    model = spec.model_class.from_backbone("tiny", num_classes=3, image_size=(32, 16), text_length=16)
    model.save_pretrained(tmp_path)
    code = (
        "import sys\n"
        "from tipr.model import TIPRModel\n"
        f"model = TIPRModel.from_pretrained({str(tmp_path)!r})\n"
        "print(type(model).__name__)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == spec.model_class.__name__
    assert out[1] == "[]"
