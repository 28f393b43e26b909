"""Times one whole head step on a fixed batch of embeddings.

Partial FC (``--head partial_fc``): sample, gather, forward, backward and the sparse
optimizer update, with a new sampling key every step. DCQ (``--head dcq``): the loss
against the queue and its gradient, and the enqueue, with random keys standing in for
the EMA encoder's (the batch is pairs of images of one identity). F²C (``--head f2c``):
both pool insertions, the loss against the pool and its gradient, with random gallery
features; half the batch is pairs of one identity, half random images. Prototype Memory
(``--head prototype_memory``): the batch's prototypes, the loss against the memory and
its gradient through them, and the memory's update; the batch is pairs of one identity.
Reports the median /
min / max milliseconds per step, the per-device sizes that dominate memory (centers +
optimizer rows or the queue, the logits) and the peak device memory where the backend
reports it (GPU/TPU), else XLA's compiled estimate. For Partial FC it also times the
step's three ``B x num_sample x D`` matmuls alone, the step's floor. ``--max-classes
--device-memory GIB`` instead searches the largest C whose compiled Partial FC step fits
that memory per device (:func:`max_classes`).
"""

from __future__ import annotations

import dataclasses
import statistics
import time

from pfc_jax.bench.report import (
    Report,
    compiled_bytes,
    device_peak_bytes,
    mib,
    select_devices,
    time_calls,
    time_steps,
)
from pfc_jax.errors import InputError


@dataclasses.dataclass
class HeadReport(Report):
    benchmark: str
    head: str
    platform: str
    device_kind: str
    devices: int
    classes: int
    batch: int
    dim: int
    rate: float | None  # Partial FC
    queue_size: int | None  # DCQ
    pool_size: int | None  # F²C
    memory_size: int | None  # Prototype Memory
    optimizer: str
    logits_dtype: str
    num_local: int
    num_sample: int
    steps: int
    ms_per_step: float
    ms_min: float
    ms_max: float
    compile_s: float
    loss_first: float
    loss_last: float
    centers_and_state_bytes: int  # per device: what dominates memory (DCQ: the queue's rows, F²C: the pool's)
    logits_bytes: int
    compiled_temp_bytes: int | None
    compiled_total_bytes: int | None
    peak_bytes: int | None
    # Partial FC: the step's three [B, num_sample, D] matmuls alone (forward logits, their
    # gradients w.r.t. the embeddings and the rows), timed as one program on the same
    # shards, dtypes and precision; the step's floor. None for the other heads.
    matmul_ms: float | None = None
    floor_ratio: float | None = None  # ms_per_step / matmul_ms
    storage_dtype: str | None = None  # Partial FC: the centers' and optimizer rows' dtype

    def title(self) -> str:
        if self.head == "dcq":
            what = f"queue={self.queue_size:,}"
        elif self.head == "f2c":
            what = f"pool={self.pool_size:,}"
        elif self.head == "prototype_memory":
            what = f"memory={self.memory_size:,}"
        else:
            what = f"rate={self.rate}" + (f" {self.storage_dtype} storage" if self.storage_dtype != "float32" else "")
        return (
            f"{self.head} head step  C={self.classes:,} B={self.batch} D={self.dim} {what} "
            f"on {self.devices} x {self.device_kind} ({self.platform})"
        )

    def rows(self):
        generated = self.head in ("dcq", "f2c", "prototype_memory")
        store = {"dcq": "queue", "f2c": "pool", "prototype_memory": "memory"}.get(self.head)
        return [
            (
                f"{store} rows per shard" if generated else "sampled per shard",
                f"{self.num_local:,}" if generated else f"{self.num_sample:,} of {self.num_local:,} rows",
            ),
            (
                "ms/step",
                f"median {self.ms_per_step:.2f}  min {self.ms_min:.2f}  max {self.ms_max:.2f}  "
                f"({self.steps} steps; compile {self.compile_s:.1f} s)",
            ),
            (store or "centers + optimizer rows", f"{mib(self.centers_and_state_bytes)} per device"),
            ("logits", f"{mib(self.logits_bytes)} per device"),
            *(
                []
                if self.matmul_ms is None
                else [
                    (
                        "matmuls alone",
                        f"{self.matmul_ms:.2f} ms (the step is {self.floor_ratio:.2f}x its three B x n x D matmuls)",
                    )
                ]
            ),
            ("compiled", f"temporaries {mib(self.compiled_temp_bytes)}, total {mib(self.compiled_total_bytes)}"),
            ("peak", mib(self.peak_bytes)),
            ("loss", f"{self.loss_first:.3f} -> {self.loss_last:.3f}"),
        ]


def add_arguments(p) -> None:
    from pfc_jax import cli

    p.add_argument(
        "--head",
        choices=("partial_fc", "dcq", "f2c", "prototype_memory"),
        default="partial_fc",
        help="--rate, --optimizer and --logits-dtype are partial_fc's, --margin partial_fc's and prototype_memory's, "
        "--queue-size dcq's, --pool-size f2c's, --memory-size prototype_memory's",
    )
    p.add_argument("--classes", type=cli.positive_int, default=None, help="number of identities C")
    p.add_argument(
        "--max-classes",
        action="store_true",
        help="partial_fc: instead of timing, find the largest C whose compiled step fits --device-memory "
        "(XLA's compiled estimate for this backend, per device; nothing is allocated)",
    )
    p.add_argument("--device-memory", type=float, default=None, help="GiB per device, for --max-classes")
    p.add_argument(
        "--compile-only",
        action="store_true",
        help="partial_fc: instead of timing, compile the step for --classes from abstract shapes and report "
        "XLA's memory per device (nothing is allocated: any C)",
    )
    p.add_argument("--batch", type=cli.positive_int, default=256, help="global batch B")
    p.add_argument("--dim", type=cli.positive_int, default=512, help="embedding size D")
    p.add_argument("--rate", type=float, default=0.1, help="partial_fc: sample rate in [0, 1]")
    p.add_argument("--queue-size", type=cli.positive_int, default=8192, help="dcq: generated weights kept")
    p.add_argument(
        "--pool-size", type=cli.positive_int, default=None, help="f2c: identity slots (default: 1%% of --classes)"
    )
    p.add_argument(
        "--memory-size",
        type=cli.positive_int,
        default=None,
        help="prototype_memory: prototype slots (default: 1%% of --classes, at least 2 x --batch)",
    )
    p.add_argument(
        "--devices",
        type=cli.positive_int,
        default=None,
        help="devices to shard over (default: all; on CPU, fakes this many)",
    )
    p.add_argument("--steps", type=cli.positive_int, default=10, help="timed steps")
    p.add_argument("--warmup", type=cli.non_negative_int, default=2, help="untimed steps after compiling")
    p.add_argument(
        "--optimizer", choices=("sgd", "adamw"), default="sgd", help="sgd: momentum 0.9, wd 5e-4 (the field's recipe)"
    )
    p.add_argument("--margin", choices=("arcface", "cosface"), default="arcface")
    p.add_argument("--logits-dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument(
        "--storage-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="partial_fc: dtype of the stored centers and optimizer rows",
    )
    p.add_argument(
        "--rounding",
        choices=("nearest", "stochastic"),
        default="stochastic",
        help="partial_fc with --storage-dtype bfloat16: how updated rows are rounded",
    )
    p.add_argument(
        "--block-rows", type=cli.non_negative_int, default=0, help="partial_fc: rows per block (0: the default)"
    )


def run(args) -> HeadReport:
    if not 0.0 <= args.rate <= 1.0:
        raise InputError(f"--rate must be in [0, 1], got {args.rate}")
    if args.max_classes:
        return max_classes(args)
    if args.compile_only:
        return compiled_memory(args)
    if args.device_memory is not None:
        raise InputError("--device-memory is for --max-classes (add it, or drop --device-memory)")
    if args.classes is None:
        raise InputError("--classes is required (or ask for --max-classes with --device-memory GIB)")
    import jax
    import jax.numpy as jnp

    from pfc_jax import heads, sharding
    from pfc_jax.heads import margins
    from pfc_jax.heads.dcq import DCQ
    from pfc_jax.heads.f2c import F2C
    from pfc_jax.heads.prototype_memory import PrototypeMemory

    devices = _devices(args)
    dcq = args.head == "dcq"
    if dcq and (args.batch % 2 or args.queue_size < args.batch // 2):
        raise InputError(
            f"--head dcq: --batch {args.batch} must be even (pairs of images) and --queue-size {args.queue_size} "
            f"at least one step's {args.batch // 2} entries"
        )
    f2c = args.head == "f2c"
    pool_size = (args.pool_size or max(-(-args.classes // 100), args.batch)) if f2c else None
    if f2c and (args.batch % 2 or pool_size < args.batch // 2):
        raise InputError(
            f"--head f2c: --batch {args.batch} must be even (pairs of images) and --pool-size {pool_size} "
            f"at least one step's {args.batch // 2} gallery features"
        )
    pm = args.head == "prototype_memory"
    memory_size = (args.memory_size or max(-(-args.classes // 100), 2 * args.batch)) if pm else None
    if pm and (args.batch % 2 or memory_size < args.batch):
        raise InputError(
            f"--head prototype_memory: --batch {args.batch} must be even (pairs of images) and --memory-size "
            f"{memory_size} at least one step's {args.batch} images"
        )
    generated = dcq or f2c or pm
    mesh = sharding.make_mesh(devices)
    margin = margins.arcface() if args.margin == "arcface" else margins.cosface()
    if dcq:
        head = DCQ(mesh, num_classes=args.classes, embedding_dim=args.dim, queue_size=args.queue_size)
    elif f2c:
        head = F2C(mesh, num_classes=args.classes, embedding_dim=args.dim, pool_size=pool_size)
    elif pm:
        head = PrototypeMemory(
            mesh, num_classes=args.classes, embedding_dim=args.dim, memory_size=memory_size, margin=margin
        )
    else:
        head = _partial_fc(args, mesh, args.classes)
    k_state, k_emb, k_lab, k_step = jax.random.split(jax.random.key(0), 4)
    batch = sharding.batch_sharding(mesh)
    state = jax.jit(head.init_state, out_shardings=head.state_shardings())(k_state)
    embeddings = jax.device_put(jax.random.normal(k_emb, (args.batch, args.dim)), batch)
    if dcq or pm:  # pairs: each identity's two images in a row
        labels = jnp.repeat(jax.random.randint(k_lab, (args.batch // 2,), 0, args.classes), 2)
        keys = jax.device_put(embeddings + 0.5 * jax.random.normal(k_step, embeddings.shape), batch) if dcq else None
    elif f2c:  # the dual sampler's batch: identity pairs, then random images
        pairs = jnp.repeat(jax.random.randint(k_lab, (args.batch // 4,), 0, args.classes), 2)
        labels = jnp.concatenate([pairs, jax.random.randint(k_step, (args.batch - pairs.shape[0],), 0, args.classes)])
        keys = jax.device_put(embeddings + 0.5 * jax.random.normal(k_step, embeddings.shape), batch)
    else:
        labels, keys = jax.random.randint(k_lab, (args.batch,), 0, args.classes), None
    labels = jax.device_put(labels, batch)

    start = time.perf_counter()
    whole = sharding.replicated(mesh)
    step = jax.jit(
        lambda state, e, lab, key, keys: heads.step(head, state, e, lab, key, keys),
        in_shardings=(head.state_shardings(), batch, batch, whole, None if keys is None else batch),
        out_shardings=(head.state_shardings(), batch, whole),
        donate_argnums=(0,),
    )
    compiled = step.lower(state, embeddings, labels, k_step, keys).compile()
    compile_s = time.perf_counter() - start
    state, outputs, times = time_steps(
        compiled,
        state,
        lambda i: (embeddings, labels, jax.random.fold_in(k_step, i), keys),
        warmup=args.warmup,
        steps=args.steps,
    )
    losses = [float(metrics["loss"]) for _, metrics in outputs]
    ms_per_step = statistics.median(times)
    matmul_ms = None if generated else _matmul_ms(head, args, mesh)
    if dcq:
        num_local = num_sample = head.queue.num_local
        state_bytes = num_local * (args.dim + 1) * 4  # weights and labels
    elif f2c:
        num_local = num_sample = head.pool.num_local
        state_bytes = num_local * (2 * args.dim + 3) * 4  # two views, labels, stamps, next view
    elif pm:
        num_local = num_sample = head.memory.num_local
        state_bytes = num_local * (args.dim + 3) * 4  # the prototype, labels, stamps, next view
    else:
        num_local, num_sample = head.num_local, head.num_sample(args.batch)
        state_bytes = _centers_and_rows_bytes(head, state)
    return HeadReport(
        benchmark="head",
        head=args.head,
        platform=devices[0].platform,
        device_kind=devices[0].device_kind,
        devices=len(devices),
        classes=args.classes,
        batch=args.batch,
        dim=args.dim,
        rate=None if generated else args.rate,
        queue_size=args.queue_size if dcq else None,
        pool_size=pool_size,
        memory_size=memory_size,
        optimizer="none" if generated else args.optimizer,
        logits_dtype="float32" if generated else args.logits_dtype,
        num_local=num_local,
        num_sample=num_sample,
        steps=args.steps,
        ms_per_step=ms_per_step,
        ms_min=min(times),
        ms_max=max(times),
        compile_s=compile_s,
        loss_first=losses[0],
        loss_last=losses[-1],
        centers_and_state_bytes=state_bytes,
        logits_bytes=args.batch * num_sample * 4,
        **compiled_bytes(compiled.memory_analysis()),
        peak_bytes=device_peak_bytes(devices),
        matmul_ms=matmul_ms,
        floor_ratio=None if matmul_ms is None else ms_per_step / matmul_ms,
        storage_dtype=None if generated else args.storage_dtype,
    )


@dataclasses.dataclass
class CapacityReport(Report):
    benchmark: str
    head: str
    platform: str
    device_kind: str
    devices: int
    batch: int
    dim: int
    rate: float
    optimizer: str
    logits_dtype: str
    device_memory_bytes: int  # the budget per device
    max_classes: int  # the largest C whose compiled step fits it
    num_sample: int  # per shard, at max_classes
    compiled_total_bytes: int  # per device, at max_classes
    compiled_temp_bytes: int
    state_bytes: int  # centers + optimizer rows per device, at max_classes
    compiles: int
    storage_dtype: str = "float32"

    def title(self) -> str:
        return (
            f"{self.head} capacity  B={self.batch} D={self.dim} rate={self.rate} {self.optimizer} "
            f"{self.storage_dtype} storage "
            f"on {self.devices} x {self.device_kind} ({self.platform}), {mib(self.device_memory_bytes)} per device"
        )

    def rows(self):
        return [
            ("largest C", f"{self.max_classes:,} identities ({self.num_sample:,} sampled per shard)"),
            (
                "compiled, at that C",
                f"total {mib(self.compiled_total_bytes)} per device: centers + optimizer rows "
                f"{mib(self.state_bytes)}, temporaries {mib(self.compiled_temp_bytes)}",
            ),
            ("searched", f"{self.compiles} compiled steps (XLA's memory analysis; the head step alone)"),
        ]


def _devices(args) -> list:
    """The devices of ``--devices``, refusing a batch they don't divide."""
    devices = select_devices(args.devices)
    if args.batch % len(devices):
        raise InputError(f"--batch {args.batch} must be a multiple of --devices {len(devices)}")
    return devices


def _compiled_fields(args, devices, at: dict) -> dict:
    """What the two compile-only reports share: the set-up and the step's memory at one C."""
    return dict(
        head=args.head,
        platform=devices[0].platform,
        device_kind=devices[0].device_kind,
        devices=len(devices),
        batch=args.batch,
        dim=args.dim,
        rate=args.rate,
        optimizer=args.optimizer,
        logits_dtype=args.logits_dtype,
        storage_dtype=args.storage_dtype,
        num_sample=at["num_sample"],
        state_bytes=at["state_bytes"],
        compiled_temp_bytes=at["compiled_temp_bytes"],
        compiled_total_bytes=at["compiled_total_bytes"],
    )


def _partial_fc(args, mesh, classes):
    import jax.numpy as jnp

    from pfc_jax import optim
    from pfc_jax.heads import margins
    from pfc_jax.heads.partial_fc import PartialFC

    return PartialFC(
        mesh,
        num_classes=classes,
        embedding_dim=args.dim,
        sample_rate=args.rate,
        margin=margins.arcface() if args.margin == "arcface" else margins.cosface(),
        optimizer=optim.sgd(0.1, 0.9, 5e-4) if args.optimizer == "sgd" else optim.adamw(1e-3),
        logits_dtype=jnp.dtype(args.logits_dtype),
        storage_dtype=args.storage_dtype,
        storage_rounding=args.rounding,
        block_rows=args.block_rows,
    )


def _compiled_step_bytes(args, mesh, classes) -> dict:
    """XLA's per-device memory for Partial FC's step at ``classes``, from abstract shapes."""
    import jax
    import jax.numpy as jnp

    head = _partial_fc(args, mesh, classes)
    state = jax.eval_shape(head.init_state, jax.random.key(0))
    embeddings = jax.ShapeDtypeStruct((args.batch, args.dim), jnp.float32)
    labels = jax.ShapeDtypeStruct((args.batch,), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    compiled = head.jit_step().lower(state, embeddings, labels, key).compile()
    return {
        **compiled_bytes(compiled.memory_analysis()),
        "num_sample": head.num_sample(args.batch),
        "state_bytes": _centers_and_rows_bytes(head, state),
    }


@dataclasses.dataclass
class CompiledReport(Report):
    benchmark: str
    head: str
    platform: str
    device_kind: str
    devices: int
    classes: int
    batch: int
    dim: int
    rate: float
    optimizer: str
    logits_dtype: str
    storage_dtype: str
    num_sample: int  # per shard
    state_bytes: int  # centers + optimizer rows per device
    compiled_temp_bytes: int
    compiled_total_bytes: int
    temp_per_sampled_rows: float  # temporaries / (num_sample x D x 4 bytes)

    def title(self) -> str:
        return (
            f"{self.head} step memory  C={self.classes:,} B={self.batch} D={self.dim} rate={self.rate} "
            f"{self.optimizer} {self.storage_dtype} storage on {self.devices} x {self.device_kind} ({self.platform})"
        )

    def rows(self):
        return [
            ("sampled per shard", f"{self.num_sample:,} rows"),
            ("centers + optimizer rows", f"{mib(self.state_bytes)} per device"),
            (
                "temporaries",
                f"{mib(self.compiled_temp_bytes)} per device "
                f"= {self.temp_per_sampled_rows:.2f} x num_sample x D x 4 bytes",
            ),
            ("total", f"{mib(self.compiled_total_bytes)} per device (XLA's memory analysis of the head step alone)"),
        ]


def compiled_memory(args) -> CompiledReport:
    """XLA's memory analysis of Partial FC's step at ``--classes``, compiled from abstract
    shapes: what a C that does not fit this machine would need per device."""
    if args.head != "partial_fc":
        raise InputError("--compile-only is for --head partial_fc")
    if args.classes is None:
        raise InputError("--compile-only needs --classes")
    devices = _devices(args)
    from pfc_jax import sharding

    at = _compiled_step_bytes(args, sharding.make_mesh(devices), args.classes)
    return CompiledReport(
        benchmark="compiled",
        classes=args.classes,
        **_compiled_fields(args, devices, at),
        temp_per_sampled_rows=at["compiled_temp_bytes"] / (at["num_sample"] * args.dim * 4),
    )


def _centers_and_rows_bytes(head, state) -> int:
    """Per device: Partial FC's centers and the optimizer state leaves with a row per center."""
    import jax

    rows = [leaf for leaf in jax.tree.leaves(state.opt_state) if leaf.shape == state.centers.shape]
    return head.num_local * head.embedding_dim * sum(leaf.dtype.itemsize for leaf in [state.centers, *rows])


def _secant(lo: int, hi: int, measure, budget: int) -> int:
    """C where the line through the memory at ``lo`` and ``hi`` reaches ``budget``."""
    m_lo, m_hi = measure(lo)["compiled_total_bytes"], measure(hi)["compiled_total_bytes"]
    if m_hi <= m_lo:
        return (lo + hi) // 2
    return lo + int((budget - m_lo) * (hi - lo) / (m_hi - m_lo))


def _bracket(lo: int, fits, measure, budget: int) -> tuple[int, int]:
    """(lo, hi) with ``fits(lo)`` and not ``fits(hi)``, from a ``lo`` that fits: the next
    size tried is 2 % past the linear estimate (at least double while it keeps fitting)."""
    hi = 2 * lo
    while fits(hi):
        guess = _secant(lo, hi, measure, budget)
        lo, hi = hi, (int(guess * 1.02) + 1 if guess > hi else 2 * hi)
    return lo, hi


def max_classes(args) -> CapacityReport:
    """Bisects C for the largest Partial FC step that XLA's compiled memory analysis puts
    within ``--device-memory`` per device, to 0.1 % of C. Memory is nearly affine in C, so
    each step interpolates between the two sizes measured last (and probes 0.1 % beyond the
    estimate to close the bracket), bisecting when that makes little progress: a handful of
    compilations instead of one per halving."""
    if args.head != "partial_fc":
        raise InputError("--max-classes is for --head partial_fc (the others' memory does not grow with C)")
    if args.device_memory is None or args.device_memory <= 0:
        raise InputError("--max-classes needs --device-memory GIB, the memory of one device (e.g. 80)")
    if args.classes is not None:
        raise InputError("--max-classes searches C itself: drop --classes")
    devices = _devices(args)
    from pfc_jax import sharding

    mesh = sharding.make_mesh(devices)
    budget = int(args.device_memory * 2**30)
    seen = {}

    def measure(c):
        if c not in seen:
            seen[c] = _compiled_step_bytes(args, mesh, c)
        return seen[c]

    fits = lambda c: measure(c)["compiled_total_bytes"] <= budget
    lo = max(1024 * len(devices), args.batch)
    if not fits(lo):
        raise InputError(
            f"--device-memory {args.device_memory} GiB: not even {lo:,} identities fit "
            f"({mib(measure(lo)['compiled_total_bytes'])} per device); give more memory or a smaller --batch/--dim"
        )
    lo, hi = _bracket(lo, fits, measure, budget)
    tol = lambda c: max(1, c // 1000)
    while hi - lo > tol(lo):
        width = hi - lo
        mid = min(max(_secant(lo, hi, measure, budget), lo + 1), hi - 1)
        if fits(mid):  # then try to close the bracket just above it
            lo, probe = mid, min(mid + tol(mid), hi - 1)
        else:  # or just below it
            hi, probe = mid, max(mid - tol(lo), lo + 1)
        if lo < probe < hi:
            lo, hi = (probe, hi) if fits(probe) else (lo, probe)
        if hi - lo > width // 2:  # interpolation made little progress: bisect once
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return CapacityReport(
        benchmark="capacity",
        device_memory_bytes=budget,
        max_classes=lo,
        compiles=len(seen),
        **_compiled_fields(args, devices, measure(lo)),
    )


def _matmul_ms(head, args, mesh) -> float:
    """The median time of Partial FC's three matmuls alone, per shard as in its loss:
    ``cos = x @ w.T`` [B, n], ``dx = g @ w`` [B, D] and ``dw = g.T @ x`` [n, D], with the
    whole batch ``x`` against each shard's ``n`` sampled rows."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from pfc_jax import sharding

    dtype, n, shards = head.logits_dtype, head.num_sample(args.batch), head.num_shards
    axis = sharding.DATA_AXIS

    def products(x, w, g):
        mm = lambda spec, a, b: jnp.einsum(
            spec, a, b, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST
        )
        return mm("bd,nd->bn", x, w), mm("bn,nd->bd", g, w)[None], mm("bn,bd->nd", g, x)

    fn = jax.jit(
        jax.shard_map(
            products,
            mesh=mesh,
            in_specs=(P(), P(axis, None), P(None, axis)),
            out_specs=(P(None, axis), P(axis), P(axis, None)),
        )
    )
    kx, kw, kg = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (args.batch, args.dim)).astype(dtype)
    w = jax.device_put(jax.random.normal(kw, (shards * n, args.dim)).astype(dtype), NamedSharding(mesh, P(axis, None)))
    g = jax.device_put(
        jax.random.normal(kg, (args.batch, shards * n)).astype(dtype), NamedSharding(mesh, P(None, axis))
    )
    compiled = fn.lower(x, w, g).compile()
    times = time_calls(compiled, (x, w, g), warmup=args.warmup, steps=args.steps)
    return statistics.median(times)
