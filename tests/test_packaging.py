"""bpfilter_lab (the tests' lab, the demo) stays out of bpfilter, and so out of the
helper frozen from it for bpfilter.ko; bpfilter's own layers import downwards only."""
import ast
import importlib.util
import os
import pkgutil
import subprocess
import sys

import bpfilter

PACKAGE = os.path.dirname(bpfilter.__file__)


def test_importing_every_bpfilter_module_leaves_the_lab_out():
    # a fresh interpreter: this one has imported the lab already
    program = """
import importlib, pkgutil, sys
import bpfilter
for module in pkgutil.walk_packages(bpfilter.__path__, "bpfilter."):
    # the preload shim is C without the Python API; __main__ runs the command
    if module.name not in ("bpfilter._preload", "bpfilter.__main__"):
        importlib.import_module(module.name)
print(sorted(name for name in sys.modules if name.split(".")[0] == "bpfilter_lab"))
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_no_bpfilter_source_names_the_lab():
    # also imports made only when a function runs, which importing modules does not reach
    for module in pkgutil.walk_packages([PACKAGE], "bpfilter."):
        origin = importlib.util.find_spec(module.name).origin
        if origin.endswith(".py"):
            with open(origin) as f:
                assert "bpfilter_lab" not in f.read(), origin


def _imports_between_units() -> dict[str, set[str]]:
    """Which of bpfilter's units (a top-level module, or a folder as a whole) each
    imports, at any depth of its code: functions' late imports count too."""
    edges: dict[str, set[str]] = {}
    for module in pkgutil.walk_packages([PACKAGE], "bpfilter."):
        origin = importlib.util.find_spec(module.name).origin
        if not origin.endswith(".py"):
            continue
        unit = module.name.split(".")[1]
        package = module.name if origin.endswith("__init__.py") else \
            module.name.rsplit(".", 1)[0]
        with open(origin) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                targets = [".".join(base + [node.module])] if node.module else \
                    [".".join(base + [alias.name]) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                targets = [node.module or ""]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                parts = target.split(".")
                if parts[0] == "bpfilter" and len(parts) > 1 and parts[1] != unit:
                    edges.setdefault(unit, set()).add(parts[1])
    return edges


def test_no_import_cycle_between_folders_and_modules():
    edges = _imports_between_units()
    assert edges["abi"] and edges["compiler"]       # the walk found the imports

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen
    cycles = sorted((a, b) for a, targets in edges.items() for b in targets
                    if a in reachable(b))
    assert cycles == []
    # the kernel ABI and the model know nothing of BPF, the compiler or the service
    for low in ("model", "abi", "tables", "netfilter"):
        assert not reachable(low) & {"bpf", "packet", "ext", "compiler", "loader", "service"}, low
    # the service answers requests; how they arrive (socket, device) sits above it
    assert "transport" not in reachable("service") and "service" in edges["transport"]
