"""Forking while gRPC is mid-call can leave the child's gRPC core holding a lock nobody will release
(a new channel in the child then hangs). Every client call and prefetch runs inside `call()`, and a
fork (a DataLoader starting its workers) first waits for the calls in flight to finish and keeps
new ones from starting until it is done.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

__all__ = ["call", "begin", "end"]

FORK_WAIT_S = 5.0  # a fork waits at most this long for calls in flight

_cv = threading.Condition()
_in_flight = 0
_forking = False


def begin() -> None:
    global _in_flight
    with _cv:
        while _forking:
            _cv.wait()
        _in_flight += 1


def end() -> None:
    global _in_flight
    with _cv:
        _in_flight -= 1
        _cv.notify_all()


@contextlib.contextmanager
def call() -> Iterator[None]:
    begin()
    try:
        yield
    finally:
        end()


def _before_fork() -> None:
    global _forking
    _cv.acquire()
    _forking = True
    _cv.wait_for(lambda: _in_flight == 0, FORK_WAIT_S)  # gives the lock up while it waits


def _after_fork_in_parent() -> None:
    global _forking
    _forking = False
    _cv.notify_all()
    _cv.release()


def _after_fork_in_child() -> None:
    global _cv, _in_flight, _forking
    _cv = threading.Condition()  # the parent's threads and their calls did not come along
    _in_flight, _forking = 0, False


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)
