"""Chain templates (compiler/templates.py): which chains share code, and that the code
does not grow with their number. Their verdicts and counters are the kernel's in
test_verdicts.py ("chains of one shape share a template", "300 user chains"), and
through the kernel's NAT core in the VM (kube-proxy's tables, test_kmod.py)."""
import os
import sys

import pytest

from bpfilter import ext
from bpfilter.bpf.btf import Btf
from bpfilter.compiler import codegen, templates
from bpfilter.decode import table_from_blob
from bpfilter.model import Family
from bpfilter.packet import facts
from bpfilter_lab.scratch import replace_blob
from verdicts import TEMPLATED, TEMPLATED6, ruleset

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools", "bench"))
import kubeproxy  # noqa: E402

pytestmark = pytest.mark.kernel


def filter_table(rules: str, family: Family = Family.IPV4):
    return table_from_blob(replace_blob(ruleset(rules), family=family), family)[1]


@pytest.mark.parametrize("family, rules", [(Family.IPV4, TEMPLATED), (Family.IPV6, TEMPLATED6)],
                         ids=["ipv4", "ipv6"])
def test_chains_of_one_shape_are_one_template_with_a_record_each(family, rules):
    planned = templates.plan(filter_table(rules, family))
    by_chain = {key: planned.templates[t].exemplar.name
                for key, (t, _) in planned.instance_of.items()}
    # S9 goes (-g) where the others jump: a shape of its own, and alone
    assert sorted(by_chain) == sorted([f"S{i}" for i in range(9)] + [f"T{i}" for i in range(10)])
    assert {by_chain[f"S{i}"] for i in range(9)} == {"S0"}
    assert {by_chain[f"T{i}"] for i in range(10)} == {"T0"}
    assert len(planned.records) == planned.count * planned.record_size


def test_what_the_code_depends_on_splits_shapes():
    """An exact port and a range of ports are different code: B0 to B6 (ranges) are
    not A's shape, and too few for one of their own; B7 (an exact port) is A's."""
    rules = "\n".join([f":A{i} -\n:B{i} -" for i in range(8)]
                      + [f"-A OUTPUT -j A{i}\n-A OUTPUT -j B{i}" for i in range(8)]
                      + [f"-A A{i} -p tcp --dport {100 + i} -j ACCEPT" for i in range(8)]
                      + [f"-A B{i} -p tcp --dport {100 + i}:{200 + i} -j ACCEPT"
                         for i in range(7)] + ["-A B7 -p tcp --dport 300 -j ACCEPT"])
    planned = templates.plan(filter_table(rules))
    assert len(planned.templates) == 1 and planned.templates[0].exemplar.name == "A0"
    assert sorted(planned.instance_of) == sorted([f"A{i}" for i in range(8)] + ["B7"])


def _nat_program_sizes(services: int, family: Family, monkeypatch) -> list[int]:
    # decoded as bpfilter.ko's helper would (addrtype, MARK and DNAT need the module
    # only to run, not to compile)
    monkeypatch.setattr(ext, "unsupported_match", lambda match, family: None)
    monkeypatch.setattr(ext, "unsupported_target", lambda target, family: None)
    blob = replace_blob(kubeproxy.iptables(services, ipv6=family is Family.IPV6), "nat",
                        family=family)
    table = table_from_blob(blob, family)[1]
    compiled = codegen.compile_table(table, facts.KernelOffsets.from_btf(Btf.vmlinux()))
    return [len(program.asm.items) for program in compiled.programs]


@pytest.mark.parametrize("family", list(Family), ids=lambda f: f.name.lower())
def test_kube_proxys_programs_do_not_grow_with_its_services(family, monkeypatch):
    """KUBE-SERVICES a run of jumps, every KUBE-SVC, KUBE-SEP and KUBE-EXT chain an
    instance of a template: 500 or 2,000 Services make the same programs, for
    iptables' tables and for ip6tables' (an IPv6 cluster)."""
    assert _nat_program_sizes(500, family, monkeypatch) == \
        _nat_program_sizes(2000, family, monkeypatch)
