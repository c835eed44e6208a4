"""Domain results to protobuf replies and back: the only place that knows both."""

from __future__ import annotations

from typing import Any

import numpy as np

from cached_client._proto import cache_pb2 as pb
from cached_client.errors import CacheError, InvalidSpec
from cached_client.wire import HANDLE, unpack_leases

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


def get_response(instance: str, store: ShmStore, results: list[Held | CacheError]) -> pb.GetResponse:
    errors = [(i, r) for i, r in enumerate(results) if isinstance(r, CacheError)]
    held = [(i, r) for i, r in enumerate(results) if not isinstance(r, CacheError)]
    # each entry keeps its record ready: a reply is one join and one column write, not 7 per item
    blank = bytes(HANDLE.itemsize)
    records = np.frombuffer(b"".join([blank if isinstance(r, CacheError) else r[0].record for r in results]),
                            dtype=HANDLE).copy()
    if held:
        records["lease"][[i for i, _ in held]] = [lease for _, (_, lease) in held]
    paths = store.segment_paths()
    segments = {s: paths[s] for s in {e.segment for _, (e, _) in held}}
    layouts = {lid: store.layouts.text(lid) for lid in {e.layout_id for _, (e, _) in held}}
    return pb.GetResponse(instance=instance, handles=records.tobytes(), errors=item_errors(errors),
                          segments=segments, layouts=layouts, control=store.control_path)


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
