"""The lab's packets, byte by byte (bpfilter_lab.packets' docstring has the layouts)."""
import socket
import struct

import pytest

from bpfilter_lab.packets import (ROUTER_ALERT_MLD, AuthenticationHeader, DestinationOptions,
                                  Fragment, HopByHop, Option, Packet, Pad1, Routing, checksum,
                                  icmpv6_error, mld_query, neighbour_solicitation, pad_n)

S, T, FAR = "2001:db8:1::2", "2001:db8:1::1", "2001:db8:7::7"


def addr(a: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, a)


def chain(pkt: bytes) -> list[tuple[int, bytes]]:
    """(number, bytes) of each extension header, as a receiver walks them."""
    out, number, at = [], pkt[6], 40
    while number in (0, 43, 44, 51, 60):
        size = 8 if number == 44 else (pkt[at + 1] + 2) * 4 if number == 51 else \
            (pkt[at + 1] + 1) * 8
        out.append((number, pkt[at:at + size]))
        number, at = pkt[at], at + size
    return out + [(number, pkt[at:])]


def transport_checksum_ok(pkt: bytes, proto: int, final_dst: str) -> bool:
    segment = chain(pkt)[-1][1]
    return checksum(pkt[8:24] + addr(final_dst) + struct.pack("!IxxxB", len(segment), proto)
                    + segment) == 0


def test_ipv6_header():
    pkt = Packet(S, T, "udp", tos=0xB8, ttl=7).build(0x1234, 9)
    version_class_label, length, next_header, hop_limit = struct.unpack_from("!IHBB", pkt)
    assert version_class_label == 6 << 28 | 0xB8 << 20 | 0x1234
    assert (length, next_header, hop_limit) == (len(pkt) - 40, 17, 7) == (24, 17, 7)
    assert pkt[8:24] == addr(S) and pkt[24:40] == addr(T)
    assert Packet(S, T, flow_label=0xABCDE).build(1, 0)[1:4] == bytes.fromhex("0abcde")


def test_the_nonce_follows_four_zero_bytes():
    assert Packet(S, T, "udp").build(1, 0xCAFE)[48:56] == bytes(4) + struct.pack("!I", 0xCAFE)


def test_extension_headers_name_each_other_and_the_transport():
    pkt = Packet(S, T, "tcp", ext=[HopByHop(), DestinationOptions(), Routing(),
                                   Fragment(), AuthenticationHeader()]).build(5, 0)
    assert [n for n, _ in chain(pkt)] == [0, 60, 43, 44, 51, 6]
    assert len(chain(pkt)[-1][1]) == 20 + 16


def test_explicit_next_headers():
    pkt = Packet(S, T, "tcp", next_header=60, ext=[HopByHop(next_header=59)]).build(1, 0)
    assert pkt[6] == 60 and pkt[40] == 59


def test_options_are_padded_to_eight_bytes():
    assert HopByHop().encode(6, 0) == bytes([6, 0, 1, 4]) + bytes(4)
    assert HopByHop((ROUTER_ALERT_MLD,)).encode(17, 0) == bytes([17, 0, 5, 2, 0, 0, 1, 0])
    assert DestinationOptions((Option(0x1E, b"abcd"),)).encode(6, 0) == \
        bytes([6, 0, 0x1E, 4]) + b"abcd"
    assert DestinationOptions((Option(0x1E, b"abcde"),)).encode(6, 0) == \
        bytes([6, 1, 0x1E, 5]) + b"abcde" + bytes([1, 5]) + bytes(5)
    assert HopByHop((Pad1(), pad_n(3), Option(0xC2, bytes(4)))).encode(6, 0) == \
        bytes([6, 1, 0, 1, 1, 0, 0xC2, 4]) + bytes(4) + bytes([1, 2, 0, 0])
    assert HopByHop(ext_len=3).encode(6, 0)[1] == 3


def test_routing_header():
    rh = Routing(type=0, segments_left=1, addresses=(FAR, T)).encode(17, 0)
    assert rh[:8] == bytes([17, 4, 0, 1, 0, 0, 0, 0]) and rh[8:] == addr(FAR) + addr(T)
    assert Routing(type=4, type_data=bytes([1, 0, 0, 9])).encode(6, 0)[4:8] == bytes([1, 0, 0, 9])


def test_fragment_header():
    assert Fragment(offset=185, more=True, ident=0xDEADBEEF).encode(6, 0) == \
        bytes([6, 0]) + struct.pack("!HI", 185 << 3 | 1, 0xDEADBEEF)
    assert Fragment().encode(6, 77)[4:] == struct.pack("!I", 77)   # the packet's tag


def test_authentication_header():
    ah = AuthenticationHeader(spi=0x100, seq=3).encode(6, 0)
    assert ah == bytes([6, 4, 0, 0]) + struct.pack("!II", 0x100, 3) + bytes(12)


def test_a_later_fragment_carries_no_transport_header():
    pkt = Packet(S, T, "tcp", ext=[Fragment(offset=8)], payload_len=16).build(1, 0)
    assert len(pkt) == 40 + 8 + 16


def test_truncation():
    whole = Packet(S, T, "tcp", ext=[DestinationOptions()]).build(1, 0)
    cut = Packet(S, T, "tcp", ext=[DestinationOptions()], truncate_ext=5).build(1, 0)
    assert cut[40:] == whole[40:45] and struct.unpack_from("!H", cut, 4)[0] == 5
    short = Packet(S, T, "tcp", ext=[DestinationOptions()], truncate_l4=12).build(1, 0)
    assert short[48:] == whole[48:60]
    with pytest.raises(ValueError):
        Packet(S, T, "udp", truncate_l4=8).build(1, 0)


def test_a_stated_length_that_lies():
    whole = Packet(S, T, "udp").build(1, 0)
    lying = Packet(S, T, "udp", stated_length=8).build(1, 0)
    assert struct.unpack_from("!H", lying, 4)[0] == 8 and lying[6:] == whole[6:]
    with pytest.raises(ValueError):
        Packet("198.18.0.2", "198.18.0.1", stated_length=8).build(1, 0)


@pytest.mark.parametrize("packet,proto", [
    (Packet(S, T, "tcp", tcp_options=b"\x02\x04\x05\xb4"), 6),
    (Packet(S, T, "udp", ext=[HopByHop(), Fragment(more=True)]), 17),
    (Packet(S, T, "icmp", icmp_type=128, icmp_rest=0x00010002), 58),
    (Packet(S, T, "icmpv6", truncate_l4=6), 58),
    (neighbour_solicitation(S, T, T, "02:bf:00:00:01:02"), 58),
    (icmpv6_error(S, T, Packet(T, S, "udp")), 58),
])
def test_checksums_cover_what_is_sent(packet, proto):
    assert transport_checksum_ok(packet.build(3, 4), proto, T)


def test_the_checksum_is_for_the_final_destination():
    packet = Packet(S, T, "udp", ext=[Routing(segments_left=1, addresses=(FAR,))])
    assert packet.final_destination == FAR
    assert transport_checksum_ok(packet.build(1, 0), 17, FAR)


def test_icmpv6_messages():
    ns = neighbour_solicitation(S, T, T, "02:bf:00:00:01:02").build(1, 0)
    assert ns[7] == 255 and chain(ns)[-1][1][0] == 135
    assert chain(ns)[-1][1][8:] == addr(T) + bytes([1, 1]) + bytes.fromhex("02bf00000102")
    error = icmpv6_error(S, T, Packet(T, S, "udp"), icmp_type=2, icmp_rest=1280).build(1, 0)
    assert chain(error)[-1][1][:8] == bytes([2, 0]) + chain(error)[-1][1][2:4] + \
        struct.pack("!I", 1280)
    assert chain(error)[-1][1][8:] == Packet(T, S, "udp").build(0, 0)
    query = mld_query("fe80::1").build(1, 0)
    assert query[7] == 1 and [n for n, _ in chain(query)] == [0, 58]


def test_the_family_follows_the_addresses():
    assert Packet("198.18.0.2", "198.18.0.1", "icmp").build(1, 0)[20] == 8   # echo request
    assert Packet(S, T, "icmp").build(1, 0)[40] == 128
    assert Packet(S, T, "icmp").proto_number == 58 and Packet(S, T, 1).header_len == 0
    with pytest.raises(ValueError):
        Packet("198.18.0.2", T).build(1, 0)
    with pytest.raises(ValueError):
        Packet(S, T, frag_offset=3).build(1, 0)
    with pytest.raises(ValueError):
        Packet("198.18.0.2", "198.18.0.1", ext=[Fragment()]).build(1, 0)


def test_ipv4_layout():
    pkt = Packet("198.18.0.2", "198.18.0.1", "tcp", options=b"\x94\x04\x00\x00",
                 tos=0x10).build(0x0102, 7)
    assert pkt[:12] == bytes.fromhex("4610003c010200004006")[:10] + pkt[10:12]
    assert checksum(pkt[:24]) == 0
    assert pkt[24:28] == struct.pack("!HH", 40000, 80) and pkt[37] == 0x02
