"""Parallelism: the ('data', 'fsdp') device mesh, shardings and FSDP rules (`mesh`), and multi-process
start-up (`distributed`). Import the modules: `from ldae_jax.parallel import mesh, distributed`.

Call `distributed.maybe_initialize(config.distributed)` first (before any device is touched), then
`mesh.make_mesh(config.mesh)`. See docs/multihost.md.
"""

from ldae_jax.parallel import distributed, mesh

__all__ = ["distributed", "mesh"]
