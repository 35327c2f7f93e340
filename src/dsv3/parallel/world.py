"""The parallel context: who this process is in a ``pp x dp`` world, with ``dp = edp x ep``.

``world = ndev * dp`` with ``ndev`` the pipeline devices (:func:`dsv3.layout.pipeline_devices`: ``pp``,
``pp / 2`` under DualPipeV, 1 without a pipeline). Expert parallelism splits the dp ranks into
``edp = dp / ep`` groups of ``ep`` consecutive ranks, each group holding all ``N_r`` routed experts
(``N_r / ep`` per rank, one contiguous block); the ``edp`` replicas of a block do data parallelism.
Ranks are node-major, ``rank = pp_idx * dp + edp_idx * ep + ep_idx``: one pipeline is the ranks
``[p * dp + dp_idx for p in range(ndev)]``, one expert-parallel group is consecutive (one node when
``ep`` is at most the GPUs per node, so with ``n_group`` routing groups over ``ep`` ranks a routing
group is one node's experts: report 2.1.2, node-limited routing). :func:`init_parallel` checks the
layout (:func:`dsv3.layout.check_layout`) before any process group exists and returns a
:class:`ParallelContext` that is passed around (nothing is module-level);
:meth:`ParallelContext.single` is the one-process context.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from dsv3.layout import SCHEDULES, check_layout, pipeline_devices

DEFAULT_TIMEOUT_S = 60.0


def pipelines_of(ndev: int, dp: int) -> list[list[int]]:
    """Global ranks of each pipeline, one per data-parallel index: ``[[p * dp + d for p in range(ndev)] for d]``."""
    return [[p * dp + d for p in range(ndev)] for d in range(dp)]


@dataclass
class ParallelContext:
    """This process's place in the world and its process groups.

    Attributes:
        rank, world_size: global rank and number of processes.
        pp, dp, ep: pipeline stages, data-parallel and expert-parallel degrees (``edp = dp // ep``).
        pp_devices: devices of one pipeline (``pp``, ``pp / 2`` under DualPipeV, 1 without a pipeline).
        schedule: the pipeline schedule's name (one of :data:`dsv3.layout.SCHEDULES`).
        device: where this process computes.
        backend: ``"gloo"`` (CPU), ``"nccl"`` (CUDA) or ``None`` (one process).
        mesh: the ``("pp", "edp", "ep")`` DeviceMesh (``None`` for one process); its ``pp``
            dimension has ``pp_devices`` entries.
        dp_group, ep_group, edp_group: process groups (``None`` for one process or degree 1
            where no communication is needed); all within this rank's pipeline device.
        timeout_s: the collective timeout of every group.
        ranks_per_node: processes per node (torchrun's ``LOCAL_WORLD_SIZE``), to count the nodes a token reaches.
    """

    rank: int = 0
    world_size: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    pp_devices: int = 1
    schedule: str = SCHEDULES[0]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    mesh: object | None = None
    dp_group: object | None = None
    ep_group: object | None = None
    edp_group: object | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    ranks_per_node: int = 1

    @classmethod
    def single(cls, device: torch.device | str | None = None) -> "ParallelContext":
        """The context of one process (no process group)."""
        return cls(device=torch.device(device) if device is not None else torch.device("cpu"))

    @property
    def edp(self) -> int:
        """Expert data-parallel degree: the replicas of each expert block."""
        return self.dp // self.ep

    @property
    def dp_rank(self) -> int:
        return self.rank % self.dp

    @property
    def pp_rank(self) -> int:
        """This rank's pipeline device (0 .. pp_devices - 1)."""
        return self.rank // self.dp

    @property
    def pipelines(self) -> list[list[int]]:
        """Global ranks of every pipeline (one per data-parallel index), device order."""
        return pipelines_of(self.pp_devices, self.dp)

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def edp_rank(self) -> int:
        return (self.rank % self.dp) // self.ep

    @property
    def is_main(self) -> bool:
        """Rank 0: the only one that writes metrics, progress and the console."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def expert_block(self, n_routed_experts: int) -> tuple[int, int]:
        """The global expert indices ``[start, end)`` this rank holds."""
        per = n_routed_experts // self.ep
        return self.ep_rank * per, (self.ep_rank + 1) * per

    def describe(self) -> str:
        pipe = f"pp {self.pp} ({self.schedule} on {self.pp_devices} devices)" if self.pp > 1 else "pp 1"
        return f"world {self.world_size} = {pipe} x dp {self.dp} (ep {self.ep} x edp {self.edp}), {self.backend or 'one process'}"

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def destroy(self) -> None:
        """Tear the process groups down (idempotent)."""
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def _user_chose_threads() -> bool:
    """Whether the user set ``OMP_NUM_THREADS``: torchrun sets it to 1 for its ranks when the user did not,
    so under torchrun (``TORCHELASTIC_RUN_ID``) it counts only where the launcher's own environment has it."""
    if "OMP_NUM_THREADS" not in os.environ:
        return False
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return True
    try:
        with open(f"/proc/{os.getppid()}/environ", "rb") as fh:
            return b"OMP_NUM_THREADS=" in fh.read()
    except OSError:  # not Linux, or no access: keep what the environment says
        return True


def rank_threads(ranks_on_node: int, cores: int | None = None) -> int | None:
    """Intra-op threads for one of ``ranks_on_node`` CPU ranks sharing this node's ``cores`` (default: the
    cores this process may run on): ``cores // ranks`` (at least 1), so that the ranks do not oversubscribe
    the cores nor leave them idle; None where the user chose ``OMP_NUM_THREADS`` (kept as given)."""
    if _user_chose_threads():
        return None
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, ranks_on_node))


def init_parallel(
    pp: int = 1,
    dp: int | None = None,
    ep: int = 1,
    *,
    n_routed_experts: int | None = None,
    timeout_s: float | None = None,
    device: str | torch.device | None = None,
    schedule: str | None = None,
) -> ParallelContext:
    """Join the world that torchrun (or a test) described in the environment.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``). Without
    ``WORLD_SIZE`` (or with 1) it returns :meth:`ParallelContext.single` after checking the layout.
    The layout is checked (:func:`dsv3.layout.check_layout`) *before* any process group is created, so a bad layout fails on every
    rank with the same one-line :class:`ConfigError`. gloo is used on CPU, NCCL on CUDA. A CPU rank
    runs :func:`rank_threads` intra-op threads (cores / ranks on the node) unless the user set
    ``OMP_NUM_THREADS``.

    Args:
        pp, dp, ep: the layout (``dp`` None: the world size over the pipeline devices).
        schedule: the pipeline schedule (DualPipeV runs ``pp`` stages on ``pp / 2`` devices).
        n_routed_experts: the model's N_r (checked against ``ep``).
        timeout_s: collective timeout (default ``DSV3_DIST_TIMEOUT`` or 60 s): a dead peer makes
            the others fail with an error within about this time instead of hanging.
        device: ``"cpu"``/``"cuda"``; default CUDA when available.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    schedule = str(schedule or SCHEDULES[0]).lower()
    pp, dp, ep = check_layout(world_size, pp, dp, ep, n_routed_experts, schedule if pp > 1 else None)
    ndev = pipeline_devices(pp, schedule)
    if timeout_s is None:
        timeout_s = float(os.environ.get("DSV3_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available() if device in (None, "auto") else torch.device(device).type == "cuda"
    if use_cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world_size == 1:
        ctx = ParallelContext.single(dev)
        ctx.timeout_s = timeout_s
        ctx.pp, ctx.schedule = pp, schedule
        return ctx

    backend = "nccl" if dev.type == "cuda" else "gloo"
    rank = _env_int("RANK", 0)
    threads = rank_threads(_env_int("LOCAL_WORLD_SIZE", world_size)) if dev.type == "cpu" else None
    if threads is not None:  # torch's default (every core in every rank) oversubscribes; torchrun's 1 idles
        torch.set_num_threads(threads)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s)
        )
    edp = dp // ep
    mesh = init_device_mesh(dev.type, (ndev, edp, ep), mesh_dim_names=("pp", "edp", "ep"))
    dp_mesh = mesh["edp", "ep"]._flatten("dp")
    return ParallelContext(
        rank=rank,
        world_size=world_size,
        pp=pp,
        dp=dp,
        ep=ep,
        pp_devices=ndev,
        schedule=schedule,
        device=dev,
        backend=backend,
        mesh=mesh,
        dp_group=dp_mesh.get_group() if dp > 1 else None,
        ep_group=mesh.get_group("ep") if ep > 1 else None,
        edp_group=mesh.get_group("edp") if edp > 1 else None,
        timeout_s=timeout_s,
        ranks_per_node=_env_int("LOCAL_WORLD_SIZE", world_size),
    )
