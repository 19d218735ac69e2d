"""iptables' own test lines for the extension-header matches, esp and ah
(libip6t_{rt,frag,hbh,dst,ipv6header,ah,mh,eui64}.t, libxt_esp.t for both families,
libipt_ah.t), through `bpfilter exec` with a private service, side by side with the
kernel's own tables in another namespace: every OK line loads, in each chain it
names, and ip6tables-legacy-save (iptables-legacy-save) prints what it prints with
the kernel; every FAIL line fails as it does with the kernel. (A focused check of
these files; the suite that runs every .t file is tests/test_iptables_suite.py.)

Each file's OK lines of a table go in at once (iptables-restore), as iptables-test.py
does in its fast mode, and its FAIL lines one by one (iptables -A).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

import test_service
from bpfilter.model import Family

pytestmark = pytest.mark.kernel
svc, nets = test_service.svc, test_service.nets     # a private service

SUITE = Path("/work/shared/iptables-tests")
FILES = {
    Family.IPV6: ["ip6/libip6t_rt.t", "ip6/libip6t_frag.t", "ip6/libip6t_hbh.t",
                  "ip6/libip6t_dst.t", "ip6/libip6t_ipv6header.t", "ip6/libip6t_ah.t",
                  "ip6/libip6t_mh.t", "ip6/libip6t_eui64.t", "libxt_esp.t"],
    Family.IPV4: ["libxt_esp.t", "libipt_ah.t"],
}
COMMAND = {Family.IPV4: "iptables-legacy", Family.IPV6: "ip6tables-legacy"}

# Lines where Debian's iptables 1.8.9 does not do what the .t files (iptables' git of
# 2026) say, with the kernel as with bpfilter: the inverted full range (`! --ahspi :`)
# saved as no range at all, and a reversed range (4:3) passed on, which the kernel
# takes (its checkentry has no such test).
T_DISAGREEMENTS = {
    "libxt_esp.t": {8, 13}, "libipt_ah.t": {15, 19}, "ip6/libip6t_ah.t": {17, 21},
    "ip6/libip6t_frag.t": {3, 8}, "ip6/libip6t_rt.t": {7, 11}, "ip6/libip6t_mh.t": {8},
}


@dataclass(frozen=True)
class Line:
    number: int
    table: str
    chains: tuple[str, ...]
    rule: str
    saved: str
    result: str


def parse(path: Path) -> list[Line]:
    """The lines of a .t file of the simple kind these are: chains, tables, comments,
    RULE;SAVED;RESULT (no external commands, no per-backend results)."""
    lines, table, chains = [], "filter", ()
    for number, text in enumerate(path.read_text().splitlines(), 1):
        if not text.strip() or text.startswith("#"):
            continue
        if text.startswith(":"):
            chains = tuple(text[1:].split(","))
        elif text.startswith("*"):
            table = text[1:]
        else:
            rule, saved, result = text.split(";")
            assert result in ("OK", "FAIL"), (path, number, text)
            lines.append(Line(number, table, chains, rule, rule if saved == "=" else saved,
                              result))
    return lines


def _save(text: str) -> str:
    return "".join(line + "\n" for line in text.splitlines()
                   if not line.startswith(("# Generated", "# Completed")))


@pytest.mark.parametrize("family, name", [(f, n) for f, names in FILES.items() for n in names],
                         ids=lambda v: v.name if isinstance(v, Family) else v)
def test_t_file(svc, nets, family, name):
    ours, theirs = nets(2)
    command = COMMAND[family]
    lines = parse(SUITE / name)
    disagreements = T_DISAGREEMENTS.get(name, set())
    for table in dict.fromkeys(line.table for line in lines):
        ok = [line for line in lines if line.table == table and line.result == "OK"]
        restore = "".join([f"*{table}\n",
                           *(f"-A {chain} {line.rule}\n" for line in ok for chain in line.chains),
                           "COMMIT\n"])
        svc.kok(theirs, f"{command}-restore", input=restore)
        done = svc.exec(ours, f"{command}-restore", input=restore)
        assert done.returncode == 0, done.stderr
        kernel = _save(svc.kok(theirs, f"{command}-save", "-t", table))
        assert _save(svc.ok(ours, f"{command}-save", "-t", table)) == kernel
        for line in ok:
            for chain in line.chains:
                found = f"\n-A {chain} {line.saved}\n" in kernel
                assert found != (line.number in disagreements), (name, line.number, chain)
        for line in lines:
            if line.table != table or line.result != "FAIL":
                continue
            for chain in line.chains:
                argv = (command, "-t", table, "-A", chain, *line.rule.split())
                kernel_fails = svc.kernel(theirs, *argv).returncode != 0
                assert kernel_fails != (line.number in disagreements), (name, line.number)
                assert (svc.exec(ours, *argv).returncode != 0) == kernel_fails, \
                    (name, line.number, chain)
        assert _save(svc.ok(ours, f"{command}-save", "-t", table)) == \
            _save(svc.kok(theirs, f"{command}-save", "-t", table))


def test_the_files_are_all_here():
    for names in FILES.values():
        for name in names:
            assert parse(SUITE / name), name
    assert re.search(r"-m eui64;;FAIL", (SUITE / "ip6/libip6t_eui64.t").read_text())
