"""Where entries live: shared-memory arenas with leases and eviction (shm.py) and the persistent disk
tier (disk.py).

Knows nothing of gRPC or models.
"""

from .shm import Entry, Owner, ShmStore
from .slot import TensorBytes

__all__ = ["ShmStore", "Entry", "Owner", "TensorBytes"]
