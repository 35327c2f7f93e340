"""The activation item and its collector: one kept tensor's bytes per token, FP8 tiles included.

An :class:`ActItem` is one storage kept between a layer's forward and its backward (see
:mod:`dsv3.plan.activations`, which lists them per module); :class:`Items` collects the items of one unit
(a layer, a head, an MTP module) and turns widths, formats and splits (``sp``, ``tp``, ``rep``,
``expert``) into elements and bytes per token of the micro-batch on one device. The recomputation
policies that keep an item are named by the tuples below (:data:`dsv3.layout.RECOMPUTE_MODES`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from dsv3.config import ModelConfig
from dsv3.layout import RECOMPUTE_MODES
from dsv3.plan.layout import Layout
from dsv3.plan.precision import DTYPE_BYTES, FP8_SCALE_BYTES, FP8_TILE, Precision

__all__ = ["ALL", "NO_RECOMPUTE", "NOT_FULL", "SELECTIVE_ONLY", "SPLITS", "ActItem", "Items", "bytes_per_token"]

ALL = RECOMPUTE_MODES
NO_RECOMPUTE = ("none",)
NOT_FULL = ("none", "selective")
SELECTIVE_ONLY = ("selective",)

SPLITS = ("sp", "tp", "rep", "expert")


@dataclass(frozen=True)
class ActItem:
    """One tensor kept for backward.

    Attributes:
        name: where it lives, e.g. ``self_attn.q_a_layernorm.rstd``.
        what: what it is, in the report's words.
        saved_by: the operator whose backward needs it.
        elems: elements per token of the micro-batch, on one device.
        dtype: its format (``bf16``, ``fp32``, ``fp8``, ``e5m6``, ``int64``, ...).
        kept_by: the recompute policies that keep it.
        split: ``sp``, ``tp``, ``rep`` or ``expert`` (see the module docstring).
        bytes_per_token: bytes per token of the micro-batch on one device: ``elems``
            times the format's width, plus FP8 tile scales and padding.
    """

    name: str
    what: str
    saved_by: str
    elems: float
    dtype: str
    kept_by: tuple[str, ...]
    split: str
    bytes_per_token: float

    def kept(self, policy: str) -> bool:
        return policy in self.kept_by

    def scaled(self, factor: float) -> "ActItem":
        """The same item with ``factor`` times the elements and bytes per token."""
        return dataclasses.replace(self, elems=self.elems * factor, bytes_per_token=self.bytes_per_token * factor)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "what": self.what,
            "saved_by": self.saved_by,
            "elements_per_token": self.elems,
            "dtype": self.dtype,
            "bytes_per_token": self.bytes_per_token,
            "kept_by": list(self.kept_by),
            "split": self.split,
        }


def _tiles(n: float) -> int:
    return math.ceil(n / FP8_TILE - 1e-9)


class Items:
    """Collects the items of one unit (a layer, a head, an MTP module).

    ``tokens`` is the unit's token count per micro-batch (b x s, or b x (s - k) for
    MTP module k) before any split: element counts are per token of it, and
    per-micro-batch constants (tables, weight copies, dL/dW) are divided by it.
    """

    def __init__(
        self, cfg: ModelConfig, layout: Layout, prec: Precision, prefix: str = "", tokens: int | None = None
    ) -> None:
        self.cfg, self.layout, self.prec, self.prefix = cfg, layout, prec, prefix
        self.tokens = layout.tokens_per_microbatch if tokens is None else tokens
        self.items: list[ActItem] = []
        self.fp8 = layout.fp8  # the recipe's structure: each FP8 Linear and SwiGLU keeps its own copies
        self.tiled = prec.fp8_cache == "fp8"  # ... in E4M3 tiles (else plain elements of fp8_cache)

    def rows(self, split: str) -> float:
        """Rows one device holds per token of the unit for a tensor of this split."""
        lay = self.layout
        return {"sp": 1 / lay.sp, "tp": 1.0, "rep": 1.0, "expert": self.cfg.num_experts_per_tok * lay.etp / lay.tp}[
            split
        ]

    def _add(
        self,
        name: str,
        what: str,
        saved_by: str,
        elems: float,
        dtype: str,
        kept_by: tuple[str, ...],
        split: str,
        nbytes: float,
    ) -> None:
        self.items.append(ActItem(self.prefix + name, what, saved_by, elems, dtype, kept_by, split, nbytes))

    def add(
        self, name: str, what: str, saved_by: str, width: float, dtype: str, kept_by: tuple[str, ...], split: str
    ) -> None:
        """A plain tensor of ``width`` elements per row (the width before the TP split for ``tp``)."""
        if split == "tp":
            width = width / self.layout.tp
        elems = self.rows(split) * width
        self._add(name, what, saved_by, elems, dtype, kept_by, split, elems * DTYPE_BYTES[dtype])

    def constant(
        self,
        name: str,
        what: str,
        saved_by: str,
        per_microbatch: float,
        dtype: str,
        kept_by: tuple[str, ...],
        split: str = "rep",
    ) -> None:
        """A tensor of ``per_microbatch`` elements per micro-batch on a device (tables, weight copies)."""
        elems = per_microbatch / self.tokens
        self._add(name, what, saved_by, elems, dtype, kept_by, split, elems * DTYPE_BYTES[dtype])

    def linear_input(
        self, name: str, what: str, saved_by: str, width: float, kept_by: tuple[str, ...], split: str
    ) -> None:
        """A Linear's input: the activation itself, or with ``--fp8`` its E4M3 copy in 128x1 token tiles."""
        if not (self.fp8 and self.tiled):
            fmt = self.prec.fp8_cache if self.fp8 else self.prec.activations
            self.add(name, what, saved_by, width, fmt, kept_by, split)
            return
        if split == "tp":
            width = width / self.layout.tp
        rows = self.rows(split) * self.tokens  # rows of the cached [rows, width] matrix per micro-batch
        padded = _tiles(rows) * FP8_TILE
        nbytes = padded * width * (DTYPE_BYTES["fp8"] + FP8_SCALE_BYTES / FP8_TILE) / self.tokens
        self._add(
            name,
            what + " (E4M3, 128x1 token tiles)",
            saved_by,
            rows * width / self.tokens,
            "fp8",
            kept_by,
            split,
            nbytes,
        )

    def row_tiled(
        self,
        name: str,
        what: str,
        saved_by: str,
        width: float,
        kept_by: tuple[str, ...],
        split: str,
        fmt: str | None = None,
    ) -> None:
        """With ``--fp8``: a tensor cached in 1x128 tiles along its width (``fmt`` ``fp8``: E4M3 padded to
        whole tiles, or ``e5m6``: packed), one FP32 scale per tile; the activation itself otherwise."""
        fmt = fmt or self.prec.fp8_cache
        if not self.fp8 or fmt not in ("fp8", "e5m6"):
            self.add(name, what, saved_by, width, fmt if self.fp8 else self.prec.activations, kept_by, split)
            return
        if split == "tp":
            width = width / self.layout.tp
        rows = self.rows(split)
        tiles = _tiles(width)
        payload = tiles * FP8_TILE * DTYPE_BYTES["fp8"] if fmt == "fp8" else width * DTYPE_BYTES[fmt]
        label = "E4M3, 1x128 tiles" if fmt == "fp8" else "E5M6, 1x128 power-of-two scales"
        self._add(
            name,
            f"{what} ({label})",
            saved_by,
            rows * width,
            fmt,
            kept_by,
            split,
            rows * (payload + tiles * FP8_SCALE_BYTES),
        )

    def expert_input(self, name: str, what: str, saved_by: str, width: float, kept_by: tuple[str, ...]) -> None:
        """A routed-expert grouped GEMM input: the token copies, or with ``--fp8`` the real rows of their E4M3
        copy tiled along tokens inside each local expert's group (FP32 scales per 128 rows of a group)."""
        if not (self.fp8 and self.tiled):
            fmt = self.prec.fp8_cache if self.fp8 else self.prec.activations
            self.add(name, what, saved_by, width, fmt, kept_by, "expert")
            return
        lay = self.layout
        rows = self.rows("expert") * self.tokens
        experts = self.cfg.n_routed_experts // lay.ep
        tiles = experts * _tiles(rows / experts)
        nbytes = (rows * width * DTYPE_BYTES["fp8"] + tiles * width * FP8_SCALE_BYTES) / self.tokens
        self._add(
            name,
            what + " (E4M3, 128x1 token tiles per expert)",
            saved_by,
            rows * width / self.tokens,
            "fp8",
            kept_by,
            "expert",
            nbytes,
        )


def bytes_per_token(items: list[ActItem], policy: str) -> float:
    """Bytes per token of the items the policy keeps."""
    return sum(i.bytes_per_token for i in items if i.kept(policy))
