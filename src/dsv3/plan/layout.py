"""The planner's layout: a parallel layout (:mod:`dsv3.layout`'s vocabulary) with TP, ZeRO and the batch it runs.

Device grid (Megatron-Core's folding, as DeepSeek-V3 uses it in section 3.2):
``gpus = pipeline_devices * TP * DP`` (pipeline devices: PP, or PP/2 under DualPipeV). Inside one
pipeline stage the attention and dense layers see TP x DP devices; the routed experts re-fold the
same devices as ETP x EP x EDP, so ``EDP = DP * TP / (EP * ETP)`` must be a whole number. ZeRO
shards the non-expert states over DP and the routed-expert states over EDP. Stage 0 holds the
embedding, the last stage the final norm, the output head and the MTP modules; which device holds
which stage is :func:`dsv3.layout.stage_devices`. :meth:`Layout.validate` checks a layout against a
model with the one layout check (:func:`dsv3.layout.check_layout`) plus the planner's own bounds
(:mod:`dsv3.plan.limits`) and TP rules.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dsv3.config import ModelConfig
from dsv3.errors import ConfigError, clip
from dsv3.layout import (
    ATTENTION_IMPLS,
    RECOMPUTE_MODES,
    TP_CONVENTIONS,
    ZERO_STAGES,
    check_layout,
    fill_microbatches,
    pipeline_devices,
)
from dsv3.plan import limits


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
        schedule: pipeline schedule, one of :data:`dsv3.layout.SCHEDULES`.
        fp8: cache the activations the FP8 recipe caches in FP8.
        stage_layers: layers per stage (``None``: balanced).
        attention: ``fused`` (flash/SDPA: no s x s scores kept) or ``eager``.
        mtp: train the MTP modules the config has.
        balance_loss: train with the sequence-wise balance loss (the trainer's alpha > 0).
        sequence_parallel: split the TP-replicated activations along the sequence (Megatron SP).
        tp_convention: what TP splits and how ZeRO groups the MoE block, one of
            :data:`~dsv3.layout.TP_CONVENTIONS` (``megatron``: dsv3 and Megatron-Core;
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
        return pipeline_devices(self.pp, self.schedule) if self.pp > 1 else self.pp

    @property
    def gpus(self) -> int:
        return self.pipeline_devices * self.tp * self.dp

    @property
    def default_microbatches(self) -> int:
        """Micro-batches per step when no global batch is given: the fewest that fill the pipeline.

        1 without a pipeline, PP for 1F1B, ZB1P and DualPipeV, 2 PP for DualPipe.
        """
        return fill_microbatches(self.pp, self.schedule)

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
        self._check_bounds(cfg)
        self._check_choices()
        self._check_tp(cfg)
        if not cfg.n_routed_experts and (self.ep != 1 or self.etp != 1):
            raise ConfigError("this model has no routed experts, so --ep and --etp must be 1")
        n = cfg.num_hidden_layers
        check_layout(
            pp=self.pp,
            dp=self.dp,
            ep=self.ep,
            n_routed_experts=cfg.n_routed_experts,
            schedule=self.schedule,
            num_layers=n if self.stage_layers is None else None,
            tp=self.tp,
            etp=self.etp,
        )
        self._check_batch(cfg)
        if self.stage_layers is not None:
            self._check_stage_layers(n)

    def _check_bounds(self, cfg: ModelConfig) -> None:
        """The model and every size within the planner's limits."""
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

    def _check_choices(self) -> None:
        """ZeRO stage, recomputation, TP convention and attention are names of :mod:`dsv3.layout`."""
        if not isinstance(self.zero, int) or self.zero not in ZERO_STAGES:
            raise ConfigError(f"--zero must be 0, 1, 2 or 3, got {clip(self.zero)}")
        if self.recompute not in RECOMPUTE_MODES:
            raise ConfigError(f"unknown --recompute {clip(self.recompute)}; choose one of {', '.join(RECOMPUTE_MODES)}")
        if self.tp_convention not in TP_CONVENTIONS:
            raise ConfigError(
                f"unknown --tp-convention {clip(self.tp_convention)}; choose one of {', '.join(TP_CONVENTIONS)}"
            )
        if self.attention not in ATTENTION_IMPLS:
            raise ConfigError(f"unknown --attention {clip(self.attention)}; choose one of {', '.join(ATTENTION_IMPLS)}")

    def _check_tp(self, cfg: ModelConfig) -> None:
        """TP splits the heads, the dense FFN and (megatron) the shared experts; ETP the expert width."""
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
        if not cfg.n_routed_experts:
            return
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

    def _check_batch(self, cfg: ModelConfig) -> None:
        """The global batch splits over DP, the pipeline is simulable, the sequence fits the model and SP."""
        if self.global_batch is not None and self.global_batch % (self.micro_batch * self.dp):
            raise ConfigError(
                f"--global-batch {self.global_batch} is not a multiple of micro-batch x DP = "
                f"{self.micro_batch} x {self.dp}; pick a global batch that is"
            )
        if self.pp > 1:  # a long step is extrapolated from simulations of at most fill + 9 micro-batches
            fill = fill_microbatches(self.pp, self.schedule)
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

    def _check_stage_layers(self, n: int) -> None:
        sl = tuple(self.stage_layers)
        if len(sl) != self.pp:
            raise ConfigError(f"--stage-layers gives {len(sl)} stages but --pp is {self.pp}; give one count per stage")
        if any((not isinstance(x, int)) or x < 0 for x in sl):
            raise ConfigError(f"--stage-layers must be non-negative integers, got {','.join(map(str, sl))}")
        if sum(sl) != n:
            raise ConfigError(
                f"--stage-layers {','.join(map(str, sl))} sums to {sum(sl)} but the model has {n} layers; make them add up to {n}"
            )
