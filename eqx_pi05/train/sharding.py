"""Sharding, stated once: a ("data", "fsdp") mesh; the batch split over both axes; every array of the
train state by one FSDP rule; multi-host through jax.distributed and per-process batch shards."""

from __future__ import annotations

import math

import equinox as eqx
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from jaxtyping import PyTree

BATCH_AXES = ("data", "fsdp")


def initialize(coordinator_address: str | None, num_processes: int, process_id: int) -> None:
    """jax.distributed.initialize when running on several processes (a no-op for one)."""
    if num_processes == 1:
        return
    if coordinator_address is None:
        raise ValueError(f"num_processes={num_processes} needs coordinator_address (host:port of process 0)")
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)


def make_mesh(fsdp_devices: int, devices=None) -> Mesh:
    """Mesh (data = n / fsdp_devices, fsdp = fsdp_devices) over all devices of all processes, with
    automatic (not explicit) axes: shardings propagate through the step from its boundary."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    if devices.size % fsdp_devices:
        raise ValueError(f"fsdp_devices={fsdp_devices} does not divide the {devices.size} devices")
    return Mesh(devices.reshape(devices.size // fsdp_devices, fsdp_devices), BATCH_AXES, axis_types=(AxisType.Auto,) * 2)


def fsdp_spec(shape: tuple[int, ...], itemsize: int, fsdp_size: int, min_bytes: int) -> PartitionSpec:
    """openpi's rule: replicated when fsdp is 1, the array is < 2-D or smaller than `min_bytes`;
    otherwise split along its largest axis divisible by the fsdp size (replicated if none is); among
    equal sizes the last axis, as openpi's reversed argsort."""
    if fsdp_size == 1 or len(shape) < 2 or math.prod(shape) * itemsize < min_bytes:
        return PartitionSpec()
    for axis in np.argsort(shape, kind="stable")[::-1]:
        if shape[axis] % fsdp_size == 0:
            return PartitionSpec(*[None] * int(axis), "fsdp")
    return PartitionSpec()


def fsdp_shardings(tree: PyTree, mesh: Mesh, min_bytes: int) -> PyTree:
    """NamedSharding for every array leaf of `tree` (concrete or abstract), by `fsdp_spec`."""
    n = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, np.dtype(x.dtype).itemsize, n, min_bytes)), tree)


def state_shardings(state: PyTree, mesh: Mesh, min_bytes: int, ema_memory: str = "device") -> PyTree:
    """`fsdp_shardings` of a train state (concrete or abstract); with `ema_memory="host"` its EMA's
    in pinned host memory (`TrainConfig.ema_memory`)."""
    shardings = fsdp_shardings(state, mesh, min_bytes)
    if ema_memory == "device" or state.ema is None:
        return shardings
    return eqx.tree_at(lambda t: t.ema, shardings, jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), shardings.ema))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over every device: data and fsdp together, as openpi."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local: PyTree, mesh: Mesh) -> PyTree:
    """One global array per leaf from this process's rows (the data pipeline gives process p the
    rows [p·b, (p+1)·b) of every global batch, the order of the mesh's devices over processes)."""
    sharding = batch_sharding(mesh)
    n = jax.process_count()
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x), (x.shape[0] * n, *x.shape[1:])), local
    )
