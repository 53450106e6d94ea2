"""Where arrays and models live: meshes and shardings, how a stack's models share the
devices, and the host side of several processes (jax.distributed).

Data parallelism splits each batch over a 'data' mesh axis, the compiler reducing the
gradients; model parallelism splits a stack's variants axis over a 'models' axis, each device
training its share with no collectives; on one device the models run in one vmapped program
('stack'), one after another ('sequential') or several at once from host threads
('concurrent').
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mnist_jax import runtime
from mnist_jax.config import TrainConfig
from mnist_jax.errors import ConfigError

DATA_AXIS = "data"
# Environment variables set by launchers that want `jax.distributed.initialize()`.
DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "MNIST_JAX_DISTRIBUTED")


def initialize_distributed() -> bool:
    """Calls `jax.distributed.initialize()` when the launcher's environment asks for it.

    `JAX_COORDINATOR_ADDRESS=host:port` with `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` (any
    launcher), or `MNIST_JAX_DISTRIBUTED=1` where JAX finds its peers itself (TPU VMs, SLURM,
    Open MPI). Host CPUs talk through gloo. Returns whether this is a multi-process run. Call
    before anything touches a device.
    """
    if not any(os.environ.get(name) for name in DISTRIBUTED_ENV):
        return False
    kwargs = {}
    for name, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        if os.environ.get(name):
            kwargs[arg] = int(os.environ[name])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    return jax.process_count() > 1


def resolve_devices(requested: int | str) -> int:
    """'all' -> every device (of all hosts); an integer must not exceed what exists."""
    available = jax.device_count()
    if requested == "all":
        return available
    n = int(requested)
    if not 1 <= n <= available:
        raise ConfigError(f"--data-parallel {n}: this run sees {available} device(s) "
                          f"({jax.devices()[0].platform}); choose 1..{available} or 'all'")
    return n


def data_mesh(n_devices: int) -> Mesh | None:
    """A 1-D mesh over the first `n_devices` devices, or None for plain single-device runs."""
    if n_devices == 1 and jax.process_count() == 1:
        return None
    devices = np.array(jax.devices()[:n_devices])
    return Mesh(devices, (DATA_AXIS,))


MODELS_AXIS = "models"


def models_mesh(n_devices: int) -> Mesh | None:
    """A 1-D mesh over the first `n_devices` devices for a stack's models axis, or None."""
    if n_devices == 1:
        return None
    if n_devices > jax.device_count():
        raise ConfigError(f"--model-parallel {n_devices}: this run sees {jax.device_count()} "
                          f"device(s); choose 1..{jax.device_count()}")
    return Mesh(np.array(jax.devices()[:n_devices]), (MODELS_AXIS,))


def models_sharding(mesh: Mesh | None) -> NamedSharding | None:
    """Sharding of a stack's (S, V, ...) leaf: the variants axis split over `mesh`."""
    return None if mesh is None else NamedSharding(mesh, PartitionSpec(None, MODELS_AXIS))


def put_models(tree: Any, mesh: Mesh) -> Any:
    """A stack's (S, V, ...) leaves with the V axis split over `mesh`: each device holds and
    trains its share of the models, which never talk to each other (no collectives)."""
    sharding = models_sharding(mesh)

    def place(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if isinstance(x, jax.Array) and x.is_fully_addressable:
            return jax.device_put(x, sharding)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(place, tree)


def batch_sharding(mesh: Mesh | None) -> NamedSharding | None:
    """Sharding of a (S, B, features) batch: the batch axis split over the devices."""
    return None if mesh is None else NamedSharding(mesh, PartitionSpec(None, DATA_AXIS))


def put(tree: Any, mesh: Mesh | None) -> Any:
    """Host arrays -> device arrays, once: replicated over `mesh`, or on the default device.

    Every process passes the same values; each fills its own devices from them.
    """
    if mesh is None:
        return jax.device_put(tree)
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(x):
        if isinstance(x, jax.Array) and x.sharding == replicated:
            return x
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(place(jax.random.key_data(x)),
                                            impl=jax.random.key_impl(x))
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, replicated)  # already global: reshard on the devices
        x = np.asarray(x)
        if jax.process_count() == 1:
            return jax.device_put(x, replicated)
        return jax.make_array_from_callback(x.shape, replicated, lambda index: x[index])

    return jax.tree.map(place, tree)


def to_host(tree: Any) -> Any:
    """Device arrays -> NumPy; replicated arrays are read from this process's first copy."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.sharding.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            from jax.experimental import multihost_utils  # shared out: gather every host's

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(get, tree)


# --- a config's placement ------------------------------------------------------------------------

def resolve(config: TrainConfig) -> str:
    """How the models of a stack share the device: `config.placement`, with 'auto' resolved.

    'auto' picks concurrent on CPU, where a lone batch-128 step cannot keep two cores busy
    (docs/benchmarks.md), sequential on CPU with --data-parallel (concurrent programs'
    collectives could interleave), and the stack on accelerators, which it keeps busy.
    """
    if config.placement != "auto":
        return config.placement
    if jax.default_backend() != "cpu" or config.model_parallel > 1:
        return "stack"
    return "concurrent" if config.data_parallel == 1 else "sequential"


def workers(n_models: int) -> int:
    """Host threads of the concurrent placement: one per CPU core this process may use."""
    return max(1, min(n_models, runtime.usable_cores()))


@functools.cache
def pool(n: int) -> concurrent.futures.ThreadPoolExecutor:
    """The concurrent placement's threads, made once per process."""
    return concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix="mnist_jax-model")


def batch_mesh(config: TrainConfig) -> Mesh | None:
    """The mesh each batch is split over, or None (one device, or the models split instead:
    with several hosts `data_mesh(1)` is one device of the first host)."""
    return None if config.model_parallel > 1 else data_mesh(config.data_parallel)


def devices_mesh(config: TrainConfig) -> Mesh | None:
    """The mesh a stack's data (replicated) and keys live on: the batch mesh, or the one its
    models are split over, or None for the default device."""
    return batch_mesh(config) or models_mesh(config.model_parallel)


def place_state(state: Any, config: TrainConfig) -> Any:
    """A stack's state on its devices: replicated for data parallelism, the variants axis
    split over `config.model_parallel` devices, or on the default device."""
    if config.model_parallel > 1:
        return put_models(state, models_mesh(config.model_parallel))
    return put(state, batch_mesh(config))
