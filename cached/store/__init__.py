"""Where entries live: shared-memory arenas with leases and eviction (and, later, disk and S3 tiers).

Knows nothing of gRPC or models.
"""

from .shm import Entry, Owner, ShmStore
from .slot import TensorBytes

__all__ = ["ShmStore", "Entry", "Owner", "TensorBytes"]
