"""Timers the service keeps where the kernel's would run (hashlimit's garbage
collection, the rate estimators' ticks): one thread calls due(now) once the earliest
of the times set per key passed, and at least every quarter of a second, which finds
the keys made meanwhile. `lock` keeps due() apart from what changes the keys."""
from __future__ import annotations

import threading
import time
from typing import Callable, Optional

POLL = 0.25


class DueTimers:
    def __init__(self, what: str, log: Callable[[str], None]):
        self.what, self.log = what, log
        self.next: dict[bytes, float] = {}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self, due: Callable[[float], object], name: str) -> None:
        self._thread = threading.Thread(target=self._run, args=(due,), name=name, daemon=True)
        self._thread.start()

    def _run(self, due) -> None:
        while not self._stop.wait(self._until_next()):
            try:
                due(time.monotonic())
            except Exception as err:     # the next round tries again
                self.log(f"{self.what} failed: {err}")

    def _until_next(self) -> float:
        if not self.next:
            return POLL
        return max(0.0, min(POLL, min(self.next.values()) - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
