"""Domain results to protobuf replies and back: the only place that knows both."""

from __future__ import annotations

from typing import Any

import numpy as np

from cached_client._proto import cache_pb2 as pb
from cached_client.errors import CacheError, InvalidSpec
from cached_client.stamp import Stamp
from cached_client.wire import HANDLE, NO_STAMP, pack_stamps, unpack_leases

from ..engine import Held
from ..store import ShmStore

__all__ = ["lease_ids", "get_response", "item_errors", "warm_progress", "stats_response", "list_response",
           "import_progress", "clients_response", "inspect_response", "diagnose_response"]


def lease_ids(data: bytes) -> list[int]:
    """Packed lease ids of a request; InvalidSpec when they are not whole uint64s."""
    try:
        return unpack_leases(data)
    except ValueError as exc:
        raise InvalidSpec(str(exc)) from None


def item_errors(errors: list[tuple[int, CacheError]]) -> list[pb.ItemError]:
    return [pb.ItemError(index=i, code=e.code, error=type(e).__name__, message=e.message) for i, e in errors]


def get_response(instance: str, store: ShmStore, results: list[Held | CacheError],
                 stamps: list[Stamp | None]) -> pb.GetResponse:
    # each entry keeps its record ready: a reply is one pass, one join and one column write
    blank = bytes(HANDLE.itemsize)
    recs: list[bytes] = []
    leases: list[int] = []
    errors: list[tuple[int, CacheError]] = []
    kept: list[Stamp] = []
    segs: set[int] = set()
    lids: set[int] = set()
    for i, (r, stamp) in enumerate(zip(results, stamps, strict=True)):
        if isinstance(r, CacheError):
            errors.append((i, r))
            recs.append(blank)
            leases.append(0)
            kept.append(NO_STAMP)
        else:
            entry, lease = r
            recs.append(entry.record)
            leases.append(lease)
            kept.append(stamp or NO_STAMP)
            segs.add(entry.segment)
            lids.add(entry.layout_id)
    records = np.frombuffer(b"".join(recs), dtype=HANDLE).copy()
    records["lease"] = leases
    paths = store.segment_paths()
    return pb.GetResponse(instance=instance, handles=records.tobytes(), errors=item_errors(errors),
                          segments={s: paths[s] for s in segs},
                          layouts={lid: store.layouts.text(lid) for lid in lids}, control=store.control_path,
                          stamps=pack_stamps(kept))


def warm_progress(p: dict[str, Any]) -> pb.WarmProgress:
    return pb.WarmProgress(done=p["done"], total=p["total"], computed=p["computed"], cached=p["cached"],
                           errors=item_errors(p["errors"]))


def stats_response(instance: str, uptime: float, stats: dict[str, Any]) -> pb.StatsResponse:
    return pb.StatsResponse(
        instance=instance, uptime_s=uptime,
        tiers={name: pb.TierStats(**t) for name, t in stats["tiers"].items()},
        counters=stats["counters"], leases=stats["leases"],
        encoders={name: _encoder_stats(info) for name, info in stats["encoders"].items()})


def _encoder_stats(info: dict[str, Any]) -> pb.EncoderStats:
    fields = pb.EncoderStats.DESCRIPTOR.fields_by_name
    return pb.EncoderStats(**{k: v for k, v in info.items() if k in fields})


def list_response(rows: list[dict[str, Any]], limit: int) -> pb.ListResponse:
    shown = rows[:limit] if limit else rows
    return pb.ListResponse(total=len(rows), entries=[
        pb.EntryInfo(key=r["key"].hex(), tier=r["tier"], bytes=r["bytes"], encoder=r["meta"].get("encoder", ""),
                     source=r["meta"].get("source", ""), spec=r["meta"].get("spec", ""), leases=r["leases"])
        for r in shown])


def import_progress(p: dict[str, Any]) -> pb.ImportProgress:
    return pb.ImportProgress(seen=p["seen"], imported=p["imported"], already=p["already"],
                             skipped=p["skipped"], examples=p["examples"])


def clients_response(rows: list[dict[str, Any]], caller: int) -> pb.ClientsResponse:
    return pb.ClientsResponse(clients=[pb.ClientInfo(**r) for r in rows], caller=caller)


def inspect_response(info: dict[str, Any]) -> pb.InspectResponse:
    return pb.InspectResponse(**{**info, "tensors": [pb.TensorInfo(**t) for t in info["tensors"]]})


def diagnose_response(info: dict[str, Any]) -> pb.DiagnoseResponse:
    return pb.DiagnoseResponse(**{**info, "segments": [pb.SegmentInfo(**s) for s in info["segments"]]})
