"""What the benchmarks share: device selection, timing, memory figures, the report."""

from __future__ import annotations

import dataclasses
import json
import time


@dataclasses.dataclass
class Report:
    """A benchmark's result. Subclasses add fields and a ``title``; :meth:`rows` lists
    the table lines. ``--json`` prints :meth:`to_json`."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    def title(self) -> str:
        raise NotImplementedError

    def rows(self) -> list[tuple[str, str]]:
        raise NotImplementedError

    def table(self) -> str:
        rows = self.rows()
        width = max(len(name) for name, _ in rows)
        return "\n".join([self.title(), *(f"  {name:<{width}}  {value}" for name, value in rows)])


def mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def select_devices(requested):
    """The first ``requested`` devices; on CPU, asks JAX for that many fake ones first."""
    import jax

    from pfc_jax.errors import InputError

    if requested is not None and jax.config.jax_platforms in (None, "", "cpu"):
        # Must happen before the CPU backend starts; harmless on other platforms.
        try:
            jax.config.update("jax_num_cpu_devices", requested)
        except RuntimeError:
            pass  # backend already up (e.g. called from a test): use what is there
    devices = jax.devices()
    if requested is None:
        return devices
    if requested > len(devices):
        raise InputError(f"--devices {requested}: only {len(devices)} {devices[0].platform} device(s) available")
    return devices[:requested]


def device_peak_bytes(devices):
    """The largest peak memory in use over ``devices``, where the backend reports it."""
    peaks = []
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001 - some backends raise instead of returning None
            stats = None
        if not stats or "peak_bytes_in_use" not in stats:
            return None
        peaks.append(stats["peak_bytes_in_use"])
    return max(peaks)


def compiled_bytes(memory, prefix: str = "") -> dict:
    """XLA's per-device estimate: temporaries, and everything live (donated inputs once)."""
    if memory is None:
        return {f"{prefix}compiled_temp_bytes": None, f"{prefix}compiled_total_bytes": None}
    total = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )
    return {f"{prefix}compiled_temp_bytes": memory.temp_size_in_bytes, f"{prefix}compiled_total_bytes": total}


def time_steps(fn, state, args_of_step, *, warmup: int, steps: int, cpu_ms: list | None = None):
    """Runs ``state, *out = fn(state, *args_of_step(i))`` for warmup + steps steps.
    Returns (state, the outputs of every step, milliseconds of each timed step); with
    ``cpu_ms``, appends to it the CPU time the process spent (all its threads) in each."""
    import jax

    times, outputs = [], []
    for i in range(warmup + steps):
        args = args_of_step(i)
        start, cpu_start = time.perf_counter(), time.process_time()
        out = fn(state, *args)
        jax.block_until_ready(out)
        state = out[0]
        outputs.append(out[1:])
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
            if cpu_ms is not None:
                cpu_ms.append((time.process_time() - cpu_start) * 1e3)
    return state, outputs, times


def time_calls(fn, args, *, warmup: int, steps: int, cpu_ms: list | None = None) -> list[float]:
    """Milliseconds of each timed ``fn(*args)`` (nothing threaded from call to call, no
    output kept); with ``cpu_ms``, appends the process's CPU time of each to it."""
    import jax

    times = []
    for i in range(warmup + steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
            if cpu_ms is not None:
                cpu_ms.append((time.process_time() - cpu_start) * 1e3)
    return times


def cores_available() -> int:
    """The CPU cores this process may run on."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
