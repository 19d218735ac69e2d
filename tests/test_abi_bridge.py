"""The struct.Struct bridge (xtables.Packed) against construct, the layouts' one
description: for every construct Struct of the ABI and of the extensions, the
derived struct has construct's size and parses and builds the very same bytes.
Editing a construct layout into something the bridge cannot follow fails here."""
import dataclasses
import random

import pytest
from construct import Array, Bytes, Int8ul, Int16ub, Int32ul, Padding, Struct

from bpfilter import ext
from bpfilter.abi import families, ipv4, ipv6
from bpfilter.abi import xtables as X
from bpfilter.abi.xtables import Packed
from bpfilter.model import Family


def _structs():
    """Every construct Struct a module of the ABI or of an extension defines."""
    modules = [X, ipv4, ipv6, ext.icmp, ext.tcp, ext.udp]
    found = {f"{m.__name__}.{name}": value for m in modules for name, value in vars(m).items()
             if isinstance(value, Struct)}
    assert {"bpfilter.abi.ipv4.ipt_entry", "bpfilter.abi.ipv6.ip6t_entry",
            "bpfilter.ext.udp.xt_udp"} <= found.keys()
    return sorted(found.items())


STRUCTS = _structs()


@pytest.mark.parametrize("name,con", STRUCTS, ids=[n for n, _ in STRUCTS])
def test_the_bridge_parses_and_builds_as_construct(name, con):
    packed = Packed(con)
    assert packed.size == con.sizeof()
    rng = random.Random(name)
    for _ in range(200):
        data = rng.randbytes(con.sizeof())
        parsed = packed.parse(data)
        assert con.parse(data) == parsed
        assert packed.build(parsed) == con.build(parsed)
        assert Packed(con).parse(b"\xaa" * 3 + data, 3) == parsed


@pytest.mark.parametrize("name,con", STRUCTS, ids=[n for n, _ in STRUCTS])
def test_fields_sit_where_construct_puts_them(name, con):
    """index() and field() agree with the flat tuple and with construct's bytes."""
    packed = Packed(con)
    data = random.Random(name).randbytes(con.sizeof())
    values = packed.unpack_from(data)
    assert len(values) == packed.count
    parsed = con.parse(data)
    for path in packed.names:
        expected = parsed
        for part in path.split("."):
            expected = expected[part]
        at = packed.index(path)
        assert (list(values[at]) if isinstance(at, slice) else values[at]) == expected
        offset, alone = packed.field(path)
        got = alone.unpack_from(data, offset)
        assert (list(got) if isinstance(at, slice) else got[0]) == expected


def test_the_compiled_layouts_are_the_ones_in_use():
    layouts = [families.of(f) for f in Family]
    for con, packed in [*((f.ip, f.ip_packed) for f in layouts),
                        *((f.entry, f.entry_packed) for f in layouts),
                        (X.xt_entry_match, X.xt_entry_match_packed),
                        (X.xt_entry_target, X.xt_entry_target_packed),
                        (X.xt_standard_target, X.xt_standard_target_packed),
                        (X.xt_error_target, X.xt_error_target_packed),
                        (X.xt_counters, X.xt_counters_packed)]:
        assert packed.struct.format == Packed(con).struct.format
    for extension in (ext.icmp.Icmp, ext.tcp.Tcp, ext.udp.Udp):
        assert extension.packed.struct.format == Packed(extension.struct).struct.format


def test_the_codec_tuples_follow_the_layouts():
    """What the codec passes positionally: RawIp(*ipt_ip values), RawIp6(*ip6t_ip6
    values) and the (pcnt, bcnt) counter pairs."""
    for family in Family:
        layout = families.of(family)
        assert [f.name for f in dataclasses.fields(layout.raw_ip)] == layout.ip_packed.names
    assert X.xt_counters_packed.names == ["pcnt", "bcnt"]


def test_nested_structs_arrays_and_padding_flatten_in_order():
    con = Struct("a" / Int8ul, Padding(3), "b" / Struct("c" / Array(2, Int32ul), "d" / Bytes(3)), "e" / Int8ul)
    packed = Packed(con)
    assert packed.struct.format == "<B3x2L3sB"
    assert packed.names == ["a", "b.c", "b.d", "e"]
    assert (packed.index("b"), packed.index("b.c"), packed.index("e")) == (slice(1, 4), slice(1, 3), 4)
    assert packed.field("b.d")[0] == 12
    obj = dict(a=1, b=dict(c=[2, 3], d=b"xyz"), e=4)
    assert packed.build(obj) == con.build(obj)
    assert packed.parse(con.build(obj)) == obj


@pytest.mark.parametrize("con", [
    Struct("a" / Int8ul, "b" / Int16ub),           # two byte orders
    Struct("a" / Struct("b" / Int8ul)[2]),         # an Array of Structs
    Struct(Int8ul),                                # an unnamed field
    Struct(Padding(2, pattern=b"\xff")),           # padding that is not zeros
])
def test_what_the_bridge_cannot_follow_is_refused(con):
    with pytest.raises(TypeError):
        Packed(con)
