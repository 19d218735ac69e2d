"""The qemu harness bpfilter.ko will be tested in (tools/vm): a guest with Debian's 6.12
kernel, the host's iptables-legacy, ip and bpftool, module autoloading and modules
built here against the kernel's headers."""
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "vm"))
import harness  # noqa: E402

pytestmark = pytest.mark.vm

HELLO_C = r"""
#include <linux/init.h>
#include <linux/module.h>
static int __init hello_init(void) { pr_info("hello: loaded\n"); return 0; }
static void __exit hello_exit(void) { pr_info("hello: unloaded\n"); }
module_init(hello_init);
module_exit(hello_exit);
MODULE_LICENSE("GPL");
"""


def test_iptables_drops_udp_between_namespaces():
    script = (ROOT / "tools/vm/scenarios/iptables-udp-drop.sh").read_text()
    result = harness.run_scenario(script)
    out = result.output
    assert result.status == 0, out
    # Autoloaded on first use, so a module owning its socket options could come first.
    assert "ip_tables: not loaded at boot" in out
    assert "ip_tables: loaded on first use" in out
    assert "port 9: received 0" in out
    assert "port 10: received 3" in out
    assert re.search(r"policy ACCEPT 3 packets", out), out
    assert re.search(r"^\s*5\s+145\s+DROP\s+(17|udp)\s.*udp dpt:9\s*$", out, re.M), out
    assert "bpftool prog show: ok" in out


def test_status_output_and_extra_files(tmp_path):
    tool = tmp_path / "tool"
    tool.write_text("#!/bin/sh\necho \"tool ran as $(id -u)\"\n")
    tool.chmod(0o755)
    data = tmp_path / "data"
    data.write_text("payload\n")
    script = "tool; cat /opt/x/data; readlink /bin; echo to-stderr >&2; printf end; exit 7"
    result = harness.run_scenario(script, {"/bin/tool": str(tool), "/opt/x/data": str(data)})
    assert result.status == 7
    # Copying into /bin must not have replaced the guest's /bin -> usr/bin.
    assert result.output == "tool ran as 0\npayload\nusr/bin\nto-stderr\nend"
    assert f"Linux version {harness.kernel_release()} " in result.console


def test_out_of_tree_module_builds_and_loads(tmp_path):
    (tmp_path / "hello.c").write_text(HELLO_C)
    (tmp_path / "Kbuild").write_text("obj-m := hello.o\n")
    built = harness.build_external("hello", {"hello.c": tmp_path / "hello.c",
                                             "Kbuild": tmp_path / "Kbuild"})
    script = """
        grep '^hello ' /proc/modules
        rmmod hello
        dmesg | grep -o 'hello: .*'
    """
    result = harness.run_scenario(script, module=str(built / "hello.ko"))
    assert result.status == 0, result.output
    assert result.output.splitlines()[0].startswith("hello ")
    assert "hello: loaded\nhello: unloaded" in result.output
