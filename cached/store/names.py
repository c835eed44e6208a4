"""The shared-memory naming scheme and its sweeper: defined in the thin client
(cached_client/shmnames.py), so `cachectl gc` needs no daemon package; re-exported here for the store."""

from cached_client.shmnames import (
    PREFIX,
    control_name,
    hold_instance_lock,
    lock_name,
    new_instance_id,
    segment_name,
    stale_files,
    sweep_stale,
)

__all__ = ["PREFIX", "new_instance_id", "segment_name", "control_name", "lock_name", "hold_instance_lock",
           "stale_files", "sweep_stale"]
