"""cached: a latent cache daemon for diffusion-model training.

Layers, each usable without the ones above it: `store` (shared memory, leases, eviction),
`encoders` (the models), `engine` (keys, batching, single flight), `server` (gRPC, config, CLI).
"""

__version__ = "0.1.0"
