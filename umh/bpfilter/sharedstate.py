"""What matches run without bpfilter.ko share by name across the tables of a
namespace, kept by the service as the kernel keeps it: -m recent's lists
(recentlists.py), -m hashlimit's htables (hashlimits.py), RATEEST's estimators
(rateests.py); and what they read of the kernel that a program cannot (wallclock.py:
-m time's clock and time zone). Each part gives the maps the programs read (maps()),
makes what a table about to be compiled names and binds
its rules to it (prepare(), as its checkentries would), and lets go of what no table
names any more (retain(), as the destroy of its last rule would)."""
from __future__ import annotations

from typing import Callable

from .hashlimits import Hashlimits
from .model import Table
from .rateests import RateEstimators
from .recentlists import RecentLists
from .wallclock import WallClock

PARTS = (RecentLists, Hashlimits, RateEstimators, WallClock)


class SharedState:
    def __init__(self, parts: list):
        self.parts = parts

    @classmethod
    def pinned(cls, root: str, log: Callable[[str], None]) -> "SharedState":
        parts: list = []
        try:
            for part in PARTS:
                parts.append(part.pinned(root, log))
        except BaseException:
            for made in parts:
                made.close()
            raise
        return cls(parts)

    @classmethod
    def create(cls) -> "SharedState":
        return cls([part.create() for part in PARTS])

    def maps(self) -> dict:
        return {ref: fd for part in self.parts for ref, fd in part.maps().items()}

    def names(self, table: Table) -> bool:
        """Whether `table` names anything shared."""
        return any(part.names(table) for part in self.parts)

    def prepare(self, inum: int, table: Table) -> None:
        for part in self.parts:
            part.prepare(inum, table)

    def retain(self, tables: dict[int, list[Table]]) -> None:
        """`tables`: for each namespace with tables, its tables."""
        for part in self.parts:
            part.retain(tables)

    def close(self) -> None:
        for part in self.parts:
            part.close()
