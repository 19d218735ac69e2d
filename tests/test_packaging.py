"""bpfilter_lab (the tests' lab, the demo) stays out of bpfilter, and so out of the
helper frozen from it for bpfilter.ko."""
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
