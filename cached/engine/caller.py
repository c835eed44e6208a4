"""Who a request is from, as the transport proved it (cached/server/auth.py, sessions.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Caller", "Call", "TCP_CALLER", "DAEMON", "INTERNAL"]


@dataclass(frozen=True)
class Caller:
    """`session` keys the caller's leases (0: a caller that may not hold any); `uid` is None for a
    TCP caller, known only by its token (it may read what anyone may read)."""

    session: int
    uid: int | None
    gids: frozenset[int] = frozenset()
    pid: int = 0

    @property
    def may_lease(self) -> bool:
        return self.session != 0


TCP_CALLER = Caller(session=0, uid=None)
DAEMON = Caller(session=0, uid=0)  # the daemon itself (prefetch of its own accord, tests)


@dataclass(frozen=True)
class Call:
    """One request as the engine sees it: who sent it, whether it still waits, until when."""

    caller: Caller
    alive: Callable[[], bool] = lambda: True
    deadline: float | None = None  # time.monotonic() after which nobody receives the answer


INTERNAL = Call(DAEMON)  # work the daemon does of its own accord
