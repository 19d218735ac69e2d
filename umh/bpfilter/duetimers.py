"""Timers the service keeps where the kernel's would run (hashlimit's garbage
collection, the rate estimators' ticks): one thread calls due(now) once the earliest
of the times set per key passed. With no key it sleeps until wake() (what makes a key
calls it), so that an idle service's threads leave the interpreter to the requests.
`lock` keeps due() apart from what changes the keys."""
from __future__ import annotations

import threading
import time
from typing import Callable, Optional


class DueTimers:
    def __init__(self, what: str, log: Callable[[str], None]):
        self.what, self.log = what, log
        self.next: dict[bytes, float] = {}
        self.lock = threading.Lock()
        self._woken = threading.Event()
        self._stopped = False
        self._thread: Optional[threading.Thread] = None

    def start(self, due: Callable[[float], object], name: str) -> None:
        """The thread; its first round finds the keys that exist already (pinned by
        an earlier service)."""
        self._woken.set()
        self._thread = threading.Thread(target=self._run, args=(due,), name=name, daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """A key was made: its time is to be taken into account."""
        self._woken.set()

    def _run(self, due) -> None:
        while True:
            self._woken.wait(self._until_next())
            if self._stopped:
                return
            self._woken.clear()
            try:
                due(time.monotonic())
            except Exception as err:     # the next round tries again
                self.log(f"{self.what} failed: {err}")

    def _until_next(self) -> Optional[float]:
        if not self.next:
            return None
        return max(0.0, min(self.next.values()) - time.monotonic())

    def stop(self) -> None:
        self._stopped = True
        self._woken.set()
        if self._thread is not None:
            self._thread.join()
