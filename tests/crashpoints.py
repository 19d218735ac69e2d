"""A bpfilter service with a fault injected at one step of a replace: the tests' side
only (never imported by bpfilter, nor frozen into its helper).

    python3 -m crashpoints CONTROL -- serve --daemon --socket S --bpffs B

starts the ordinary service with every operation that changes what is pinned,
attached or held wrapped (pins, renames, symlinks, unlinks, directories, hook slot
fills, links, conntrack holds, and the reads a replace makes after the swap). While
a request runs `_Caller._replace` (arm "replace") or creates a table
(`_Caller._install` without a previous table, arm "create"), those operations are
numbered from 1, and the one numbered N gets the fault the file CONTROL asks for
(read at every arming, so one service can take several faults):

    <arm> <mode> <N>     mode: "exit" (SIGKILL before step N), "raise" (an OSError
                         instead of step N), "count" (no fault)

Every armed step's name is appended to CONTROL + ".steps" (truncated at each
arming): a "count" run tells the tests how many steps a replace has. Step K+1 is
"answer": the request is done and its answer not yet sent.
"""
from __future__ import annotations

import errno
import functools
import os
import shutil
import signal
import sys

from bpfilter import cli, ctnetns, loader, service
from bpfilter.bpf import syscall as bpf

_control = ""
_armed = False
_mode, _at, _step = "count", 0, 0


def _arm(what: str) -> None:
    global _armed, _mode, _at, _step
    with open(_control) as f:
        arm, _mode, at = f.read().split()
    _at, _step = int(at), 0
    _armed = arm == what
    if _armed:
        open(_control + ".steps", "w").close()


def step(name: str) -> None:
    global _step
    if not _armed:
        return
    _step += 1
    with open(_control + ".steps", "a") as f:
        f.write(f"{name}\n")
    if _step != _at or _mode == "count":
        return
    if _mode == "exit":
        os.kill(os.getpid(), signal.SIGKILL)
    raise OSError(errno.EIO, f"fault injected at step {_step} ({name})")


def _wrap(owner, name: str) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        step(f"{getattr(owner, '__name__', owner)}.{name}")
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def _armed_during(owner, name: str, arm, last_step: bool = True) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        global _armed
        what = arm(*args, **kwargs)
        if what is None:
            return original(*args, **kwargs)
        _arm(what)
        try:
            result = original(*args, **kwargs)
            if last_step:
                step("answer")
            return result
        finally:
            _armed = False

    setattr(owner, name, wrapper)


def install() -> None:
    for name in ("rename", "symlink", "unlink", "rmdir", "mkdir"):
        _wrap(os, name)
    _wrap(shutil, "rmtree")
    for name in ("obj_pin", "link_detach", "link_create_netfilter", "map_delete_batch",
                 "wait_for_programs"):
        _wrap(bpf, name)
    _wrap(loader.HookSlot, "fill")
    _wrap(loader.Ruleset, "packed_counters")
    _wrap(loader.Ruleset, "took_over")
    _wrap(ctnetns, "hold")
    _wrap(ctnetns, "release")
    _armed_during(service._Caller, "_replace", lambda *a, **k: "replace")
    _armed_during(service._Caller, "_install",
                  lambda self, key, blob, raw, table, previous: None if previous else "create")


if __name__ == "__main__":
    _control = os.path.abspath(sys.argv[1])
    assert sys.argv[2] == "--"
    install()
    sys.exit(cli.main(sys.argv[3:]))
