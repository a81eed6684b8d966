"""The platform a traced program is compiled for.

Usually jax.default_backend(). `llmjax plan --target v5e-16` compiles the train step on a
CPU host for a TPU topology (devices from jax.experimental.topologies): the step is traced
under a mesh of TPU devices while the default backend is the CPU, and kernel choices
(splash on TPU, the CPU custom-VJP kernels on CPU, Pallas interpret mode off TPU) must
follow the devices the program will run on.
"""
from __future__ import annotations

import jax


def platform() -> str:
    """'tpu', 'gpu' or 'cpu': the current mesh's devices' platform (inside `jax.set_mesh`
    with a concrete mesh), else the default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()
