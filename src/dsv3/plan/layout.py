"""A parallel layout: how a training run spreads a model over devices, and its checks.

Device grid (Megatron-Core's folding, as DeepSeek-V3 uses it in section 3.2):
``gpus = pipeline_devices * TP * DP`` where ``pipeline_devices`` is PP, or PP/2
for DualPipeV (which runs its PP stages on PP/2 devices, two per device). Inside
one pipeline stage the attention and dense layers see TP x DP devices; the
routed experts re-fold the same TP x DP devices as ETP x EP x EDP, so

    EDP = DP * TP / (EP * ETP)

must be a whole number. ZeRO shards the non-expert states over DP and the
routed-expert states over EDP (the replicas of each expert shard).

Pipeline stages (``--stage-layers``, or :func:`balanced_stage_layers`): stage
0 holds the embedding, the last stage the final norm, the output head and the
MTP modules. Under DualPipe device i holds stages i and PP-1-i (each stage
therefore sits on two devices, "2x parameters"); under DualPipeV device i holds
stages i and PP-1-i of PP stages on PP/2 devices. Either way the first device
holds both the embedding and the output head, as the report requires.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dsv3.config import ModelConfig
from dsv3.errors import ConfigError
from dsv3.plan import limits
from dsv3.plan.limits import clip
from dsv3.plan.params import TP_CONVENTIONS

SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")
RECOMPUTE = ("none", "selective", "full")
ATTENTION_IMPLS = ("fused", "eager")


@dataclass(frozen=True)
class Layout:
    """A parallel layout and the batch it runs.

    Attributes:
        pp: pipeline stages (DualPipeV runs them on ``pp // 2`` devices).
        tp: tensor-parallel size (MLA up-projections and W^O, dense MLP, shared
            experts, embedding and head split; sequence parallel for activations).
        ep: expert-parallel size (routed experts split N_r / EP per rank).
        etp: expert tensor-parallel size (each routed expert's width split).
        dp: data-parallel size.
        zero: ZeRO stage 0..3 (1: optimizer states, 2: + gradients, 3: + weights sharded).
        recompute: ``none``, ``selective`` (RMSNorm and the MLA up-projections recomputed,
            report 3.2.3, and the FFN from its cached GEMM outputs unless FP8 caching is on;
            see :mod:`dsv3.memory.recompute`) or ``full`` (each decoder layer recomputed).
        seq_len: tokens per sequence s.
        micro_batch: sequences per micro-batch b.
        global_batch: sequences per optimizer step (``None``: :attr:`default_microbatches` per DP rank).
        schedule: pipeline schedule, one of :data:`SCHEDULES`.
        fp8: cache the activations the FP8 recipe caches in FP8.
        stage_layers: layers per stage (``None``: balanced).
        attention: ``fused`` (flash/SDPA: no s x s scores kept) or ``eager``.
        mtp: train the MTP modules the config has.
        balance_loss: train with the sequence-wise balance loss (the trainer's alpha > 0).
        sequence_parallel: split the TP-replicated activations along the sequence (Megatron SP).
        tp_convention: what TP splits and how ZeRO groups the MoE block, one of
            :data:`~dsv3.plan.params.TP_CONVENTIONS` (``megatron``: dsv3 and Megatron-Core;
            ``zhang-su``: the accounting of arXiv 2502.07846).
    """

    pp: int = 1
    tp: int = 1
    ep: int = 1
    etp: int = 1
    dp: int = 1
    zero: int = 1
    recompute: str = "none"
    seq_len: int = 4096
    micro_batch: int = 1
    global_batch: int | None = None
    schedule: str = "1f1b"
    fp8: bool = False
    stage_layers: tuple[int, ...] | None = None
    attention: str = "fused"
    mtp: bool = True
    balance_loss: bool = True
    sequence_parallel: bool = True
    tp_convention: str = "megatron"

    # ------------------------------------------------------------ derived sizes
    @property
    def edp(self) -> int:
        """Expert data-parallel size DP * TP / (EP * ETP)."""
        return self.dp * self.tp // (self.ep * self.etp)

    @property
    def pipeline_devices(self) -> int:
        """Devices one pipeline spans: PP, or PP/2 for DualPipeV."""
        return self.pp // 2 if self.schedule == "dualpipev" else self.pp

    @property
    def gpus(self) -> int:
        return self.pipeline_devices * self.tp * self.dp

    @property
    def default_microbatches(self) -> int:
        """Micro-batches per step when no global batch is given: the fewest that fill the pipeline.

        1 without a pipeline, PP for 1F1B, ZB1P and DualPipeV, 2 PP for DualPipe.
        """
        if self.pp == 1:
            return 1
        return 2 * self.pp if self.schedule == "dualpipe" else self.pp

    @property
    def batch(self) -> int:
        """Sequences per optimizer step (``global_batch``, or :attr:`default_microbatches` per DP rank)."""
        if self.global_batch is not None:
            return self.global_batch
        return self.micro_batch * self.dp * self.default_microbatches

    @property
    def microbatches(self) -> int:
        """Micro-batches each pipeline runs per step: global_batch / (micro_batch * DP)."""
        return self.batch // (self.micro_batch * self.dp)

    @property
    def tokens_per_microbatch(self) -> int:
        return self.micro_batch * self.seq_len

    @property
    def sp(self) -> int:
        """The factor sequence parallelism divides the replicated activations by."""
        return self.tp if self.sequence_parallel else 1

    def replace(self, **changes) -> "Layout":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["stage_layers"] = list(self.stage_layers) if self.stage_layers is not None else None
        out.update(
            edp=self.edp,
            gpus=self.gpus,
            pipeline_devices=self.pipeline_devices,
            global_batch=self.batch,
            microbatches=self.microbatches,
        )
        return out

    def short(self) -> str:
        """``PP16 TP1 EP64 ETP1 DP128 ZeRO-1 dualpipe selective``."""
        parts = [f"PP{self.pp}", f"TP{self.tp}", f"EP{self.ep}", f"ETP{self.etp}", f"DP{self.dp}", f"ZeRO-{self.zero}"]
        extra = (["fp8"] if self.fp8 else []) + ([self.tp_convention] if self.tp_convention != "megatron" else [])
        return " ".join(parts + [self.schedule, self.recompute] + extra)

    # ------------------------------------------------------------ checks
    def validate(self, cfg: ModelConfig) -> None:
        """Raise :class:`ConfigError` with one sentence for the first thing that does not fit ``cfg``.

        Every size is bounded (:mod:`dsv3.plan.limits`), so that planning a valid
        layout takes bounded time and memory.
        """
        limits.check_model(cfg)
        for name in ("pp", "tp", "ep", "etp", "dp"):
            limits.check_int(name, getattr(self, name), maximum=limits.MAX_GPUS)
        for name in ("seq_len", "micro_batch"):
            limits.check_int(name.replace("_", "-"), getattr(self, name))
        if self.global_batch is not None:
            limits.check_int("global-batch", self.global_batch)
        if self.gpus > limits.MAX_GPUS:
            raise ConfigError(
                f"the layout needs {self.gpus:,} GPUs, more than the {limits.MAX_GPUS:,} the planner handles; "
                f"lower --dp, --tp or --pp"
            )
        if not isinstance(self.zero, int) or self.zero not in (0, 1, 2, 3):
            raise ConfigError(f"--zero must be 0, 1, 2 or 3, got {clip(self.zero)}")
        if self.recompute not in RECOMPUTE:
            raise ConfigError(f"unknown --recompute {clip(self.recompute)}; choose one of {', '.join(RECOMPUTE)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {clip(self.schedule)}; choose one of {', '.join(SCHEDULES)}")
        if self.tp_convention not in TP_CONVENTIONS:
            raise ConfigError(
                f"unknown --tp-convention {clip(self.tp_convention)}; choose one of {', '.join(TP_CONVENTIONS)}"
            )
        if self.attention not in ATTENTION_IMPLS:
            raise ConfigError(f"unknown --attention {clip(self.attention)}; choose one of {', '.join(ATTENTION_IMPLS)}")
        h = cfg.num_attention_heads
        if h % self.tp:
            raise ConfigError(
                f"{h} attention heads cannot be split over --tp {self.tp}; choose a TP size that divides {h}"
            )
        has_dense = any(not cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
        if has_dense and cfg.intermediate_size % self.tp:
            raise ConfigError(
                f"the dense FFN width {cfg.intermediate_size} cannot be split over --tp {self.tp}; "
                f"choose a TP size that divides it"
            )
        if cfg.n_routed_experts:
            n_r = cfg.n_routed_experts
            if n_r % self.ep:
                raise ConfigError(
                    f"{n_r} routed experts cannot be split over --ep {self.ep}; choose an EP size that divides {n_r}"
                )
            if cfg.moe_intermediate_size % self.etp:
                raise ConfigError(
                    f"the expert width {cfg.moe_intermediate_size} cannot be split over --etp {self.etp}; "
                    f"choose an ETP size that divides it"
                )
            shared = cfg.n_shared_experts * cfg.moe_intermediate_size
            if shared and shared % self.tp and self.tp_convention == "megatron":  # zhang-su replicates them
                raise ConfigError(
                    f"the shared-expert width {shared} cannot be split over --tp {self.tp}; choose a TP size that divides it"
                )
        elif self.ep != 1 or self.etp != 1:
            raise ConfigError("this model has no routed experts, so --ep and --etp must be 1")
        if (self.dp * self.tp) % (self.ep * self.etp):
            raise ConfigError(
                f"EP x ETP = {self.ep * self.etp} must divide DP x TP = {self.dp * self.tp}, because the expert "
                f"layers re-fold the same devices; raise --dp or lower --ep/--etp"
            )
        if self.schedule in ("dualpipe", "dualpipev") and self.pp % 2:
            raise ConfigError(f"{self.schedule} needs an even number of pipeline stages, got --pp {self.pp}")
        if self.global_batch is not None and self.global_batch % (self.micro_batch * self.dp):
            raise ConfigError(
                f"--global-batch {self.global_batch} is not a multiple of micro-batch x DP = "
                f"{self.micro_batch} x {self.dp}; pick a global batch that is"
            )
        if self.pp > 1:  # a long step is extrapolated from simulations of at most fill + 9 micro-batches
            fill = 2 * self.pp if self.schedule == "dualpipe" else self.pp
            limits.check_pipeline_depth(self.pp, min(self.microbatches, fill + 9), self.schedule)
        if self.seq_len > cfg.max_position_embeddings:
            raise ConfigError(
                f"--seq-len {self.seq_len} exceeds the model's max_position_embeddings "
                f"({cfg.max_position_embeddings}); use a shorter sequence"
            )
        if self.seq_len % self.sp:
            raise ConfigError(
                f"--seq-len {self.seq_len} cannot be split over TP {self.tp} for sequence parallelism; use a multiple of {self.tp}"
            )
        n = cfg.num_hidden_layers
        if self.stage_layers is not None:
            sl = tuple(self.stage_layers)
            if len(sl) != self.pp:
                raise ConfigError(
                    f"--stage-layers gives {len(sl)} stages but --pp is {self.pp}; give one count per stage"
                )
            if any((not isinstance(x, int)) or x < 0 for x in sl):
                raise ConfigError(f"--stage-layers must be non-negative integers, got {','.join(map(str, sl))}")
            if sum(sl) != n:
                raise ConfigError(
                    f"--stage-layers {','.join(map(str, sl))} sums to {sum(sl)} but the model has {n} layers; make them add up to {n}"
                )
        elif self.pp > n:
            raise ConfigError(f"{n} layers cannot fill --pp {self.pp} stages; use at most {n} stages")


def stage_devices(pp: int, schedule: str) -> list[list[int]]:
    """``out[dev]`` = the pipeline stages device ``dev`` holds (see module docstring)."""
    if schedule == "dualpipe":
        return [sorted({i, pp - 1 - i}) for i in range(pp)]
    if schedule == "dualpipev":
        return [[i, pp - 1 - i] for i in range(pp // 2)]
    return [[i] for i in range(pp)]


def devices_of_stage(pp: int, schedule: str) -> list[list[int]]:
    """``out[stage]`` = the pipeline devices that hold ``stage``."""
    out: list[list[int]] = [[] for _ in range(pp)]
    for dev, stages in enumerate(stage_devices(pp, schedule)):
        for s in stages:
            out[s].append(dev)
    return out


def balanced_stage_layers(layer_costs: list[float], first_extra: float, last_extra: float, pp: int) -> tuple[int, ...]:
    """Contiguous split of the layers into ``pp`` stages that minimises the slowest stage.

    Args:
        layer_costs: cost (forward FLOPs per token) of each decoder layer.
        first_extra: cost the first stage carries besides its layers (the embedding).
        last_extra: cost the last stage carries (final norm, output head, MTP modules).
        pp: number of stages, at most ``len(layer_costs)``.

    Returns:
        Layers per stage, each at least 1. Among splits with the smallest maximum
        stage cost, the one with the smallest sum of squared stage costs (the most
        even) is returned; remaining ties go to the split that gives the last stage
        the most layers, then the one before it, and so on (dynamic programming over
        stages; the candidates for a stage's first layer are scanned from the back and
        the scan stops once the stage alone costs more than the best found, so the work
        is about ``n^2`` steps, not ``pp * n^2``).
    """
    if any(c < 0 for c in layer_costs) or first_extra < 0 or last_extra < 0:
        raise ValueError("balanced_stage_layers needs non-negative costs")
    n = len(layer_costs)
    prefix = [0.0]
    for c in layer_costs:
        prefix.append(prefix[-1] + c)
    inf = (float("inf"), float("inf"))

    def cost(stage: int, a: int, b: int) -> float:  # layers a..b-1 on stage `stage`
        extra = (first_extra if stage == 0 else 0.0) + (last_extra if stage == pp - 1 else 0.0)
        return prefix[b] - prefix[a] + extra

    # best[k][j]: (max cost, sum of squares) placing the first j layers on stages 0..k-1
    best = [[inf] * (n + 1) for _ in range(pp + 1)]
    choice = [[0] * (n + 1) for _ in range(pp + 1)]
    best[0][0] = (0.0, 0.0)
    for k in range(1, pp + 1):
        lo = k
        hi = n - (pp - k)
        for j in range(lo, hi + 1):
            cand = inf
            arg = 0
            for i in range(j - 1, k - 2, -1):  # stage k-1 gets layers i..j-1; fewer layers first
                c = cost(k - 1, i, j)
                if c > cand[0]:
                    break  # earlier starts only make this stage dearer
                prev = best[k - 1][i]
                if prev[0] == float("inf"):
                    continue
                val = (max(prev[0], c), prev[1] + c * c)
                if val <= cand:  # ties: the earliest start, as a forward scan keeping the first would
                    cand, arg = val, i
            best[k][j] = cand
            choice[k][j] = arg
    out = []
    j = n
    for k in range(pp, 0, -1):
        i = choice[k][j]
        out.append(j - i)
        j = i
    return tuple(reversed(out))


def stage_layer_indices(stage_layers: tuple[int, ...]) -> list[list[int]]:
    """Layer indices of each stage from the layer counts."""
    out, start = [], 0
    for n in stage_layers:
        out.append(list(range(start, start + n)))
        start += n
    return out
