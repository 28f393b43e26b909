"""Joining a multi-process run: ``jax.distributed`` set-up, called by ``main`` first.

One process per host (or per GPU) runs the same command; together they form one mesh
over all their devices (:func:`pfc_jax.sharding.make_mesh` uses ``jax.devices()``, the
devices of every process). :func:`initialize` decides whether this process is one of
several and, if so, calls ``jax.distributed.initialize`` before anything touches a
device. In order:

1. Explicit settings, from the flags ``--coordinator``, ``--num_processes``,
   ``--process_id`` or else the environment variables ``JAX_COORDINATOR_ADDRESS``,
   ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``. ``num_processes`` 1 means a single process.
2. A multi-task SLURM step (``srun`` with more than one task) or Open MPI job:
   ``jax.distributed.initialize()`` detects coordinator, process count and id itself
   (on SLURM, process ``SLURM_LOCALID`` of a node uses that node's GPU of the same index).
3. A Cloud TPU VM (``libtpu`` installed): JAX's auto-detection, which reads the pod's
   workers from the TPU metadata; when it finds no pod, a single process.
4. Otherwise a single process: nothing to initialize.

On CPU, collectives between processes need a CPU collectives implementation; gloo (TCP)
is selected unless one is configured already.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Mapping

from pfc_jax.errors import InputError

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"  # also read by jax.distributed itself
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


class DistributedError(InputError):
    """Inconsistent multi-process settings; the message names the flag and the fix."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """How this process joins (or not) a multi-process run.

    ``mode``: ``single`` (no initialization), ``explicit`` (all three values known),
    ``detect`` (values left ``None`` come from JAX's cluster auto-detection) or
    ``detect_or_single`` (like ``detect``, but a single process when JAX finds no cluster).
    """

    mode: str
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    reason: str = ""


def _int_setting(flag_value, flag: str, env: Mapping[str, str], var: str) -> tuple[int | None, str]:
    """(value, where it came from) of an integer flag with an environment fallback."""
    if flag_value is not None:
        return int(flag_value), f"--{flag}"
    raw = env.get(var, "").strip()
    if not raw:
        return None, ""
    try:
        return int(raw), var
    except ValueError:
        raise DistributedError(f"{var}={raw!r} is not an integer") from None


def _check_coordinator(address: str, source: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(
            f"{source}={address!r}: expected HOST:PORT, the address of process 0 and a free "
            "port on it, the same on every process (e.g. --coordinator=10.0.0.1:8476)"
        )


def _slurm_tasks(env: Mapping[str, str]) -> int:
    """Tasks of the current SLURM step (0 outside ``srun``).

    JAX's SLURM detection needs these variables; ``SLURM_STEP_NUM_TASKS`` (when set)
    wins over ``SLURM_NTASKS`` so that the batch script itself, which is one process of
    a many-task job, is not mistaken for one of the tasks.
    """
    needed = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if not all(name in env for name in needed):
        return 0
    try:
        return int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"])
    except ValueError:
        return 0


def _cluster(env: Mapping[str, str]) -> str | None:
    """The multi-process job environment JAX can detect by itself, if any."""
    if _slurm_tasks(env) > 1:
        return f"SLURM step with {_slurm_tasks(env)} tasks"
    try:
        if int(env.get("OMPI_COMM_WORLD_SIZE", "0")) > 1:
            return f"Open MPI job with {env['OMPI_COMM_WORLD_SIZE']} processes"
    except ValueError:
        pass
    return None


def _tpu_runtime_installed() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def plan(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    env: Mapping[str, str] | None = None,
) -> Plan:
    """Decides how to join from the flags (``None``: not given) and ``env`` (default: the
    process environment). Changes nothing.

    Raises:
      DistributedError: inconsistent or malformed settings.
    """
    env = os.environ if env is None else env
    if coordinator is not None:
        coord_source = "--coordinator"
    elif env.get(ENV_COORDINATOR, "").strip():
        coordinator, coord_source = env[ENV_COORDINATOR].strip(), ENV_COORDINATOR
    else:
        coordinator, coord_source = None, ""
    n, n_source = _int_setting(num_processes, "num_processes", env, ENV_NUM_PROCESSES)
    i, i_source = _int_setting(process_id, "process_id", env, ENV_PROCESS_ID)
    cluster = _cluster(env)

    if coordinator is not None:
        _check_coordinator(coordinator, coord_source)
    if n is not None and n < 1:
        raise DistributedError(f"{n_source}={n}: the number of processes must be >= 1")
    if i is not None and n is None:
        raise DistributedError(
            f"{i_source}={i} without --num_processes: give both (and --coordinator), "
            "the same --num_processes and --coordinator on every process"
        )
    if n is not None:
        if i is None:
            if n == 1:
                i = 0
            else:
                raise DistributedError(
                    f"{n_source}={n} without --process_id: give each process its id 0..{n - 1} with --process_id"
                )
        if not 0 <= i < n:
            raise DistributedError(f"{i_source}={i} is out of range for {n_source}={n}: ids run from 0 to {n - 1}")
        if n == 1:
            return Plan("single", reason=f"{n_source}=1")
        if coordinator is None:
            raise DistributedError(
                f"{n_source}={n} needs --coordinator=HOST:PORT (process 0's address and a "
                "free port, the same on every process)"
            )
        return Plan("explicit", coordinator, n, i, reason=f"{coord_source}, {n_source}, {i_source}")
    if coordinator is not None:
        if cluster is None:
            raise DistributedError(
                f"{coord_source}={coordinator!r} without --num_processes and --process_id: give "
                "all three (or run under srun / on a TPU pod, which provide the other two)"
            )
        return Plan("detect", coordinator, reason=f"{cluster}, {coord_source}")
    if cluster is not None:
        return Plan("detect", reason=cluster)
    if _tpu_runtime_installed():
        return Plan("detect_or_single", reason="Cloud TPU runtime installed")
    return Plan("single", reason="no multi-process settings or job environment")


def _use_cpu_collectives() -> None:
    """Cross-process collectives on the CPU backend: gloo, unless one is configured."""
    import jax

    if not jax.config.jax_cpu_collectives_implementation:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    env: Mapping[str, str] | None = None,
) -> Plan:
    """Joins the multi-process run this process belongs to, if any (see module docstring).

    Call it once, before anything touches a device. Returns the :class:`Plan` followed.

    Raises:
      DistributedError: inconsistent settings, or a job environment JAX cannot read.
    """
    p = plan(coordinator, num_processes, process_id, env)
    if p.mode == "single":
        return p
    import jax

    if jax.distributed.is_initialized():
        return p  # e.g. a launcher that initialized already
    _use_cpu_collectives()
    try:
        jax.distributed.initialize(
            coordinator_address=p.coordinator, num_processes=p.num_processes, process_id=p.process_id
        )
    except ValueError as e:  # JAX's auto-detection found no (complete) cluster description
        if p.mode == "detect_or_single":
            return Plan("single", reason=f"{p.reason}, but no TPU pod detected")
        if p.mode == "detect":
            raise DistributedError(
                f"{p.reason}, but JAX could not read the job's layout ({e}); pass --coordinator, "
                "--num_processes and --process_id explicitly"
            ) from None
        raise
    return p
