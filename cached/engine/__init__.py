"""The engine: specs to keys, single-flight misses, dynamic batches, results sealed into the store."""

from .batcher import Batcher, Job
from .engine import EncoderOptions, Engine, Held
from .keys import FORMAT_VERSION, entry_key
from .prefetch import Prefetcher
from .sources import Sources
from .tiers import Tiers

__all__ = ["Engine", "EncoderOptions", "Held", "Batcher", "Job", "Sources", "Tiers", "Prefetcher", "entry_key", "FORMAT_VERSION"]
