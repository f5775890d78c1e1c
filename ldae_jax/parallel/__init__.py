"""Parallelism: the ('data', 'fsdp') device mesh, shardings and FSDP rules (`mesh`), multi-process
start-up (`distributed`) and the CPU host's device count (`cpu_devices`). Import the modules:
`from ldae_jax.parallel import mesh, distributed, cpu_devices`.

Call `cpu_devices.configure(config)` and `distributed.maybe_initialize(config.distributed)` first (before any
device is touched), then `mesh.make_mesh(config.mesh)`. See docs/multihost.md.
"""

from ldae_jax.parallel import cpu_devices, distributed, mesh

__all__ = ["cpu_devices", "distributed", "mesh"]
