"""Matches and targets bpfilter.ko runs as the kernel's own (ext/xtmatch.py) because
what they keep or reach lives only in the kernel:

  connlimit  the kernel's connection counting (nf_conncount)
  osf        the operating system fingerprints nfnetlink_osf loads
  ipvs       IPVS's connections
  cgroup     the sending socket's cgroup
and targets that hand the packet to a kernel subsystem without changing it: NFLOG
(nfnetlink_log), AUDIT, IDLETIMER (its sysfs timers), LED (its trigger) and TEE
(nf_dup_ipv4/6: the copy passes the namespace's hooks, bpfilter's programs run again
inside the target, as ip_tables' do).
bpfilter.ko runs only those it lists (kmod/xtmatch.c). (-m bpf's classic programs
are translated into the rules' own code: cbpf.py.)

bpfilter's model of each is its payload: the kernel's checkentry judges it, with its
errno, when the table is loaded. Without bpfilter.ko such a table is refused. (RATEEST
and rateest, string, u32 and policy, which bpfilter runs without it too, have files of
their own.)
"""
from __future__ import annotations

import ipaddress

from construct import Bytes, Int8un, Int16un, Int32un, Padding, Struct

from . import BOTH_FAMILIES
from ..model import Family, Hook
from .xtmatch import c_string, plain_kernel_extension

_STATE = "whose state only the kernel keeps"
_HANDS = "which hands the packet to a kernel subsystem"

xt_connlimit_info = Struct("mask" / Bytes(16), "limit" / Int32un, "flags" / Int32un, Padding(8))
xt_cgroup_info_v0 = Struct("id" / Int32un, "invert" / Int32un)
xt_cgroup_info_v1 = Struct("has_path" / Int8un, "has_classid" / Int8un,
                           "invert_path" / Int8un, "invert_classid" / Int8un,
                           "path" / Bytes(4096), "classid" / Int32un, Padding(8))
xt_cgroup_info_v2 = Struct("has_path" / Int8un, "has_classid" / Int8un,
                           "invert_path" / Int8un, "invert_classid" / Int8un,
                           "path" / Bytes(512), Padding(12))
xt_nflog_info = Struct("len" / Int32un, "group" / Int16un, "threshold" / Int16un,
                       "flags" / Int16un, Padding(2), "prefix" / Bytes(64))
xt_audit_info = Struct("type" / Int8un)
idletimer_tg_info = Struct("timeout" / Int32un, "label" / Bytes(28), Padding(8))
idletimer_tg_info_v1 = Struct("timeout" / Int32un, "label" / Bytes(28), "send_nl_msg" / Int8un,
                              "timer_type" / Int8un, Padding(14))
xt_osf_info = Struct("genre" / Bytes(32), "len" / Int32un, "flags" / Int32un,
                     "loglevel" / Int32un, "ttl" / Int32un)
xt_ipvs_mtinfo = Struct("vaddr" / Bytes(16), "vmask" / Bytes(16), "vport" / Int16un,
                        "l4proto" / Int8un, "fwd_method" / Int8un, "vportctl" / Int16un,
                        "invert" / Int8un, "bitmask" / Int8un)
xt_led_info = Struct("id" / Bytes(27), "always_blink" / Int8un, "delay" / Int32un,
                     "_internal" / Bytes(8))
xt_tee_tginfo = Struct("gw" / Bytes(16), "oif" / Bytes(16), "_priv" / Bytes(8))

IPPROTO_TCP = 6
_OSF_HOOKS = sum(1 << h.value for h in (Hook.LOCAL_IN, Hook.PRE_ROUTING, Hook.FORWARD))
XT_CONNLIMIT_INVERT = 0x01
XT_AUDIT_TYPES = ("accept", "drop", "reject")


plain_kernel_extension("match", "connlimit", xt_connlimit_info, BOTH_FAMILIES, revisions=(1,),
                       why=_STATE, family_independent=True,
                       describe=lambda f: "#conn "
                       f"{'<=' if f['flags'] & XT_CONNLIMIT_INVERT else '>'} {f['limit']}")
for revision, struct in ((0, xt_cgroup_info_v0), (1, xt_cgroup_info_v1), (2, xt_cgroup_info_v2)):
    plain_kernel_extension("match", "cgroup", struct, BOTH_FAMILIES, revisions=(revision,),
                           why=_STATE, family_independent=True,
                           describe=lambda f: "cgroup " + (c_string(f["path"]) if "path" in f
                                                           else str(f.get("id", ""))))
# the fingerprints nfnetlink_osf loads
plain_kernel_extension("match", "osf", xt_osf_info, (Family.IPV4,), why=_STATE,
                       proto=IPPROTO_TCP, hooks=_OSF_HOOKS,
                       describe=lambda f: f"OS fingerprint match {c_string(f['genre'])}")
# IPVS's connections (ip_vs_conn)
plain_kernel_extension("match", "ipvs", xt_ipvs_mtinfo, BOTH_FAMILIES, why=_STATE,
                       family_independent=True, describe=lambda f: "ipvs")

plain_kernel_extension("target", "NFLOG", xt_nflog_info, BOTH_FAMILIES, why=_HANDS,
                       family_independent=True,
                       describe=lambda f: f"nflog-group {f['group']}"
                       + (f' nflog-prefix "{c_string(f["prefix"])}"' if f["prefix"][0] else ""))
plain_kernel_extension("target", "AUDIT", xt_audit_info, BOTH_FAMILIES, why=_HANDS,
                       family_independent=True,
                       describe=lambda f: "AUDIT " + (XT_AUDIT_TYPES[f["type"]]
                                                      if f["type"] < 3 else "??"))
for revision, struct in ((0, idletimer_tg_info), (1, idletimer_tg_info_v1)):
    plain_kernel_extension("target", "IDLETIMER", struct, BOTH_FAMILIES, why=_HANDS,
                           revisions=(revision,), family_independent=True,
                           describe=lambda f: f"timeout:{f['timeout']} "
                           f"label:{c_string(f['label'])}")
# a copy routed to --gateway (nf_dup_ipv4/6), which passes the hooks of the namespace,
# bpfilter's programs among them, before the original goes on
plain_kernel_extension("target", "TEE", xt_tee_tginfo, BOTH_FAMILIES, why=_HANDS,
                       revisions=(1,),
                       describe=lambda f: "TEE gw:" + (str(ipaddress.ip_address(f["gw"][:4]))
                                                      if not any(f["gw"][4:])
                                                      else str(ipaddress.ip_address(f["gw"]))))
plain_kernel_extension("target", "LED", xt_led_info, BOTH_FAMILIES, why=_HANDS,
                       family_independent=True,
                       describe=lambda f: f"led-trigger-id:\"{c_string(f['id'])}\"")
