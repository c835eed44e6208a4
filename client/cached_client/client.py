"""CacheClient: what a DataLoader worker uses to read entries.

The client object is plain data (an address and timeouts): it pickles into spawned workers and
survives fork. Everything live (the gRPC channel, the identity session, the segment mappings, the
handle cache and the leases) is made lazily in the process that uses it, keyed by pid.

This module is the data path (get, resolve, release) and the client's state; the operator calls
(warm, evict, ls, stats, ...) come from OperationsMixin (operations.py), and the calls themselves,
their retries and their errors from Transport (transport.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from ._proto import cache_pb2 as pb
from ._proto import cache_pb2_grpc
from .errors import CacheError, LimitExceeded, error_for
from .gather import Resolved
from .handles import ProcessState, process_state
from .operations import OperationsMixin, WarmResult
from .specs import ImageSpec, Spec, encode_specs
from .stamp import source_stamp
from .transport import CHANNEL_OPTIONS, Transport
from .transport import _mapped as _mapped  # imported from here by tests/test_errors.py
from .views import HAVE_TORCH, Entry, Lease, Segment, shm_error
from .wire import check_handles, decode_layout, pack_leases, unpack_handles, unpack_stamps

__all__ = ["CacheClient", "WarmResult"]


class CacheClient(OperationsMixin, Transport):
    """Reads cache entries from the local cached daemon as zero-copy tensor views.

    `address` is resolved as DESIGN.md says when not given. A call that can't reach the daemon keeps
    retrying for `connect_timeout` seconds, then raises DaemonUnavailable; the same client works again
    once the daemon is back. `timeout` bounds a whole call, encoding included (None: no bound).
    Tensors are torch tensors when torch is importable, numpy arrays otherwise (or `tensors="numpy"`).
    Over TCP, calls carry `token` (default: the contents of the file $CACHED_TOKEN_FILE names).
    """

    def __init__(self, address: str | None = None, *, timeout: float | None = None,
                 connect_timeout: float = 10.0, tensors: str = "auto", token: str | None = None) -> None:
        if connect_timeout < 0:
            raise ValueError(f"connect_timeout must be >= 0, got {connect_timeout!r}")
        if tensors not in ("auto", "torch", "numpy"):
            raise ValueError(f"tensors must be 'auto', 'torch' or 'numpy', got {tensors!r}")
        if tensors == "torch" and not HAVE_TORCH:
            raise ValueError("tensors='torch' but torch is not installed")
        self.address = address
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.tensors = tensors
        self.token = token
        self._target: str | None = None

    # pickling and fork: only the configuration travels

    def __getstate__(self) -> dict[str, Any]:
        return {"address": self.address, "timeout": self.timeout,
                "connect_timeout": self.connect_timeout, "tensors": self.tensors, "token": self.token}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"CacheClient({self.target!r})"

    def _process(self) -> ProcessState:
        """This process's state for the target: shared by every client of the process, as the
        daemon sees one session (one holder of leases) per process."""
        return process_state(self.target, self._new_state)

    def _new_state(self, target: str) -> ProcessState:
        channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        proc = ProcessState(channel, cache_pb2_grpc.CacheStub(channel), open_fd=self._open_segment)
        releaser = CacheClient(target, timeout=5.0, connect_timeout=1.0, tensors=self.tensors, token=self.token)
        proc.start_watcher(lambda ids: releaser._release(proc, ids), releaser._daemon_alive)
        return proc

    # the public surface

    def get(self, specs: Sequence[Spec], encoder: str, compute: bool = True) -> list[Entry]:
        """One Entry per spec, in order. Misses are encoded by the daemon unless compute=False, which
        raises CacheMiss instead. An item that fails raises its error (the first one, by index).
        A spec repeated in `specs` is asked for once and its entries share their views."""
        proc = self._process()
        want_torch = self.tensors == "torch" or (self.tensors == "auto" and HAVE_TORCH)
        out: list[Entry | None] = [None] * len(specs)
        wanted: dict[Spec, list[int]] = {}
        with proc.lock:
            proc.reap()
            for i, spec in enumerate(specs):
                lease = proc.lookup((encoder, spec))
                if lease is None:
                    wanted.setdefault(spec, []).append(i)
                else:
                    out[i] = Entry(lease.key.hex(), spec, lease.views(proc.dead, want_torch))
            release = proc.take_due()
        if wanted:
            try:
                self._fetch(proc, encoder, wanted, compute, release, out, want_torch)
            except LimitExceeded:  # this process's lease cap: give the idle leases back, try again
                with proc.lock:
                    proc.reap()
                    release = proc.take_idle()
                if not release:
                    raise
                left = {s: ix for s, ix in wanted.items() if out[ix[0]] is None}
                self._fetch(proc, encoder, left, compute, release, out, want_torch)
        elif release:
            self._release(proc, release)
        return out  # type: ignore[return-value]

    def resolve(self, specs: Sequence[Spec] | bytes, encoder: str, compute: bool = True,
                release: Sequence[int] = ()) -> Resolved:
        """The handles of many items in one RPC, as arrays (gather.py), each leased to this process
        until given back with `release` (or piggybacked on the next resolve). What the loader and
        the DataLoader handle mode use; `get` is the per-item view of the same thing. `specs` may
        be packed already (spec lines joined by newlines). Items over this process's lease cap are
        asked for again once its idle leases are given back."""
        proc = self._process()
        lines = specs if isinstance(specs, bytes) else encode_specs(list(specs))
        resolved = self._resolve(proc, lines, encoder, compute, list(release))
        if any(isinstance(e, LimitExceeded) for e in resolved.errors.values()):
            with proc.lock:
                proc.reap()
                idle = proc.take_idle()
            if idle:
                resolved = self._resolve(proc, lines, encoder, compute, idle + resolved.lease_ids)
        return resolved

    def _resolve(self, proc: ProcessState, lines: bytes, encoder: str, compute: bool, release: list[int]) -> Resolved:
        count = lines.count(b"\n") + 1 if lines else 0
        reply = self._call(proc, "Get", pb.GetRequest(encoder=encoder, specs=lines, compute=compute,
                                                       release=pack_leases(release)))
        failed = {e.index: e for e in reply.errors}
        records = check_handles(reply.handles, count, failed, reply.segments, reply.layouts)
        stamps = unpack_stamps(reply.stamps, count)
        with proc.lock:
            try:
                _attach(proc, reply)
            except CacheError:  # granted, but this process can't use them: back with the next call
                proc.due.extend(int(x) for x in records["lease"] if x)
                raise
            segments = {sid: proc.segments[path] for sid, path in reply.segments.items()}
            layouts = {lid: proc.layouts[lid] for lid in reply.layouts}
        errors = {j: error_for(e.code, f"item {j}: {e.message}", e.error) for j, e in failed.items()}
        return Resolved(records, segments, layouts, errors, stamps)

    def segment(self, path: str) -> Segment:
        """The daemon's segment at `path`, mapped in this process (once)."""
        proc = self._process()
        with proc.lock:
            if path not in proc.segments:
                proc.segments[path] = Segment(path, proc.open_fd)
            return proc.segments[path]

    def release(self, lease_ids: Sequence[int]) -> None:
        """Gives back leases of `resolve`."""
        if lease_ids:
            self._release(self._process(), list(lease_ids))

    def loader(self, specs: Any, encoder: str | Sequence[str] | None, batch_size: int, **options: Any) -> Any:
        """A workerless loader over `specs`: an iterable of epochs of collated batches (loader.py).
        Options: shuffle, seed, drop_last, rank, world_size, prefetch_batches, pin_memory, device,
        batch_sampler, compute, window. Needs torch."""
        from .loader import Loader

        return Loader(self, specs, encoder, batch_size, **options)

    def _release(self, proc: ProcessState, ids: list[int]) -> None:
        self._call(proc, "Release", pb.ReleaseRequest(leases=pack_leases(ids)))

    def _fetch(self, proc: ProcessState, encoder: str, wanted: dict[Spec, list[int]], compute: bool,
               release: list[int], out: list[Entry | None], want_torch: bool) -> None:
        specs = list(wanted)
        request = pb.GetRequest(encoder=encoder, specs=encode_specs(specs), compute=compute,
                                release=pack_leases(release))
        # before the call: a rewrite after it is caught by the next lookup
        stamps = [source_stamp(s.path) if isinstance(s, ImageSpec) else None for s in specs]
        reply = self._call(proc, "Get", request)
        failed = {e.index: e for e in reply.errors}
        records = unpack_handles(reply.handles, len(specs), failed, reply.segments, reply.layouts)
        with proc.lock:
            granted = specs
            try:
                _attach(proc, reply)
            except CacheError:  # granted, but this process can't use them: back with the next call
                proc.due.extend(lease_id for _, lease_id, *_ in records if lease_id)
                if not failed:
                    raise
                granted = []  # the call raises its first item's error below: what the daemon said is the news
            for j, spec in enumerate(granted):
                if j in failed:
                    continue
                key, lease_id, _, offset, length, segment, layout = records[j]
                key = key.ljust(32, b"\0")  # numpy's S32 drops trailing zero bytes
                lease = proc.adopt_lease((encoder, spec), stamps[j], Lease(
                    key, lease_id, proc.segments[reply.segments[segment]], offset, length,
                    proc.layouts[layout], reply.instance))
                if failed:  # this call raises: nobody will see these views, so the lease is idle now
                    if not lease.alive():
                        proc.idle[lease.lease_id] = lease
                    continue
                for i in wanted[spec]:
                    out[i] = Entry(lease.key.hex(), spec, lease.views(proc.dead, want_torch))
        if failed:
            first = failed[min(failed)]
            raise error_for(first.code, f"item {wanted[specs[first.index]][0]}: {first.message}", first.error)

    def close(self) -> None:
        """Gives back the leases whose views are gone. Leases of views still alive stay held (by
        this process's session) until they die or the process exits."""
        proc = process_state(self.target)
        if proc is None:
            return
        with proc.lock:
            proc.reap()
            release = proc.take_idle()
        if release:
            try:
                self._release(proc, release)
            except CacheError:
                pass  # the daemon gives them back when this process is gone


def _attach(proc: ProcessState, reply: pb.GetResponse) -> None:
    """Follows the reply's daemon and maps the segments and tensor tables it names; a CacheError when
    this process can't (views.shm_error says why)."""
    try:
        proc.adopt(reply.instance, reply.control)
    except OSError as exc:  # its control page
        raise shm_error(reply.control, exc) from exc
    for path in reply.segments.values():
        if path not in proc.segments:
            proc.segments[path] = Segment(path, proc.open_fd)
    for lid, text in reply.layouts.items():
        proc.layouts.setdefault(lid, decode_layout(text))
