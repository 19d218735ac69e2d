"""`bpfilter exec -- CMD ARGS...`: run an unmodified iptables against the service.
`bpfilter env`: the same for every command of a shell or script.

Without bpfilter.ko nothing routes iptables' socket options to the service, so
the command runs with the preload shim (umh/bpfilter/shim/preload.c) that does.
`exec` starts an interpreter for each command (tens of milliseconds); a script
that runs iptables rule by rule (as Docker, ufw or fail2ban do) can instead
`eval "$(bpfilter env)"` once: its iptables commands then reach the service as
directly as they would through bpfilter.ko.
"""
from __future__ import annotations

import errno
import importlib.util
import os
import socket
import sys

from .errors import BpfilterError
from .paths import DEFAULT_ROOT, DEFAULT_SOCKET

START_TIMEOUT = 10.0


def shim_path() -> str:
    spec = importlib.util.find_spec("bpfilter._preload")
    if spec is None or not spec.origin or not os.path.exists(spec.origin):
        raise BpfilterError(errno.ENOENT, "the preload shim bpfilter._preload is not built; "
                                          "reinstall the package (pip install -e .)")
    return spec.origin


def answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def _without(shim: str, preload: str) -> str:
    return " ".join(p for p in preload.replace(":", " ").split() if p != shim)


def start_service(path: str, bpffs: str, shim: str) -> None:
    """Start `bpfilter serve --daemon` on path and wait until it answers."""
    # here, not at the top: every iptables command run through `bpfilter exec` would
    # pay for importing what only the first one needs
    import subprocess
    import tempfile
    import time
    # It moves to the host's network and mount namespaces by itself (daemon.py).
    argv = [sys.executable, "-m", "bpfilter", "serve", "--daemon", "--socket", path,
            "--bpffs", bpffs]
    env = dict(os.environ)
    # A shimmed service would send its own kernel calls to itself.
    preload = _without(shim, env.pop("LD_PRELOAD", ""))
    if preload:
        env["LD_PRELOAD"] = preload
    deadline = time.monotonic() + START_TIMEOUT
    # A file, not a pipe, for its stderr: a daemon that keeps the descriptor
    # would otherwise hold our caller's pipe open long after we are gone.
    with tempfile.TemporaryFile() as log:
        try:
            proc = subprocess.Popen(argv, env=env, cwd="/", stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=log)
        except OSError as err:
            raise BpfilterError(err.errno, f"cannot start the bpfilter service: {argv[0]}: "
                                           f"{err.strerror}") from None
        while not answers(path):
            rc = proc.poll()
            if rc not in (None, 0) or time.monotonic() > deadline:
                if rc is None:
                    proc.kill()
                    proc.wait()
                log.seek(0)
                detail = log.read().decode(errors="replace").strip()
                why = f"exited with {rc}" if rc is not None else f"did not listen within {START_TIMEOUT:g} s"
                raise BpfilterError(errno.ECONNREFUSED, f"the bpfilter service at {path} {why}"
                                                        + (f": {detail}" if detail else ""))
            time.sleep(0.05)
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            # Listening but never detached: leave it running, it serves.
            pass


def environment(socket_path: str = DEFAULT_SOCKET, bpffs: str = DEFAULT_ROOT) -> "dict[str, str]":
    """What a command needs in its environment for its iptables socket options to
    reach the service (started if it does not answer): the shim preloaded, and
    where the service listens."""
    shim = shim_path()
    path = os.path.abspath(socket_path)
    if not answers(path):
        start_service(path, os.path.abspath(bpffs), shim)
    others = _without(shim, os.environ.get("LD_PRELOAD", ""))   # once, however often asked
    return {"BPFILTER_SOCKET": path, "LD_PRELOAD": f"{shim}:{others}" if others else shim}


def run(argv: "list[str]", socket_path: str = DEFAULT_SOCKET, bpffs: str = DEFAULT_ROOT) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise BpfilterError(errno.EINVAL, "exec needs a command: bpfilter exec -- iptables ...")
    env = dict(os.environ, **environment(socket_path, bpffs))
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as err:
        print(f"bpfilter: cannot run {argv[0]}: {err.strerror}", file=sys.stderr)
        return 127 if err.errno == errno.ENOENT else 126


def print_environment(socket_path: str = DEFAULT_SOCKET, bpffs: str = DEFAULT_ROOT) -> int:
    """`bpfilter env`: the environment as shell exports, for eval."""
    import shlex
    for name, value in environment(socket_path, bpffs).items():
        print(f"export {name}={shlex.quote(value)}")
    return 0
