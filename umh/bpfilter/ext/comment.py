"""-m comment --comment TEXT (struct xt_comment_info): no effect on packets."""
from __future__ import annotations

from dataclasses import dataclass

from construct import Bytes, Struct

from ..model import Match
from . import BOTH_FAMILIES, MatchExtension, register_match

XT_MAX_COMMENT_LEN = 256

xt_comment_info = Struct("comment" / Bytes(XT_MAX_COMMENT_LEN))


@dataclass(frozen=True)
class CommentMatch(Match):
    text: bytes      # the whole buffer, as the kernel keeps it
    name = "comment"
    revision = 0


@register_match
class Comment(MatchExtension):
    name = "comment"
    families = BOTH_FAMILIES
    family_independent = True
    struct = xt_comment_info

    def decode(self, payload: bytes, where: str) -> CommentMatch:
        # the kernel checks nothing: the text need not even end in a NUL
        return CommentMatch(self.packed.unpack_from(payload)[0])

    def emit(self, match: CommentMatch, asm, out) -> None:
        pass

    def describe(self, match: CommentMatch) -> str:
        # iptables cuts the text at its last byte, then prints it as a C string
        text = match.text[:XT_MAX_COMMENT_LEN - 1].split(b"\0", 1)[0]
        return f"/* {text.decode(errors='replace')} */"
