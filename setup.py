"""Only the preload shim lives here; pyproject.toml holds the package's metadata.

The shim is plain C without the Python API: declaring it as an extension just
makes every install (editable included) compile it next to the package, where
`bpfilter exec` finds it with importlib and hands it to LD_PRELOAD.
"""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "bpfilter._preload",
            sources=["umh/bpfilter/shim/preload.c"],
            include_dirs=["kmod"],
            depends=["kmod/bpfilter_proto.h"],
            libraries=["dl"],
        )
    ],
)
