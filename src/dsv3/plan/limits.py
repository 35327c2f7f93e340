"""The planner's bounds: every size it accepts, in one place, so that no input costs unbounded time or memory.

Some of ``dsv3 plan``'s work grows with its inputs (the simulator runs one op per stage and micro-batch,
the stage split and the inventory walk every layer, the search tries every layout, the timeline draws
every op). Each entry point checks its inputs here first and refuses an absurd size with one sentence
(:class:`~dsv3.errors.ConfigError`; the CLI prints one line, exit code 2): GPUs up to ``MAX_GPUS``, other
counts up to ``MAX_COUNT``, layers ``MAX_LAYERS``, simulated cells ``MAX_PIPELINE_CELLS``, search
layouts ``MAX_SEARCH_LAYOUTS``, plots ``MAX_PLOT_DEVICES`` x ``MAX_PLOT_CELLS``; floats must be finite.
The table of bounds and their measured worst cases: docs/planner.md ("The planner's bounds").
Nothing here imports torch.
"""

from __future__ import annotations

import math

from dsv3.errors import ConfigError

MAX_GPUS = 2**20
MAX_COUNT = 2**40
MAX_LAYERS = 1024
MAX_MTP_LAYERS = 16
MAX_PIPELINE_CELLS = 2**15
MAX_SEARCH_LAYOUTS = 10_000
MAX_PLOT_DEVICES = 32
MAX_PLOT_CELLS = 1024


def check_int(name: str, value: object, *, minimum: int = 1, maximum: int = MAX_COUNT) -> int:
    """``value`` if it is an integer in ``[minimum, maximum]``; otherwise a ConfigError naming ``--name``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"--{name} must be an integer, got {value!r}")
    if value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"--{name} must be {what}, got {_show(value)}")
    if value > maximum:
        raise ConfigError(f"--{name} {_show(value)} is more than the planner handles (at most {maximum:,})")
    return value


def check_size(name: str, value: object, maximum: int = 2**60) -> int:
    """A memory size in bytes: a positive integer below ``maximum`` (an exbibyte)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < maximum:
        raise ConfigError(f"--{name} must be a positive size below 1 EiB, got {_show(value)} bytes")
    return value


def _show(value: object) -> str:
    """``value`` for a message: with thousands separators, or its digit count when it is absurdly long."""
    if isinstance(value, int) and not isinstance(value, bool):
        digits = len(str(abs(value)))
        return f"{value:,}" if digits <= 24 else f"{'-' if value < 0 else ''}(a {digits}-digit number)"
    return repr(value)


def check_float(
    name: str, value: object, *, minimum: float = 0.0, inclusive: bool = True, maximum: float = math.inf
) -> float:
    """``value`` as a finite float in ``[minimum, maximum]`` (``(minimum, maximum]`` when not ``inclusive``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"--{name} must be a number, got {value!r}")
    x = float(value)
    low = x >= minimum if inclusive else x > minimum
    if not (math.isfinite(x) and low and x <= maximum):
        side = ">=" if inclusive else ">"
        top = f" and <= {maximum:g}" if math.isfinite(maximum) else ""
        raise ConfigError(f"--{name} must be a finite number {side} {minimum:g}{top}, got {value}")
    return x


def check_gpus(name: str, value: object) -> int:
    """A GPU count: a positive integer up to :data:`MAX_GPUS`."""
    return check_int(name, value, maximum=MAX_GPUS)


def check_pipeline(pp: int, microbatches: int, name: str = "microbatches") -> None:
    """Bound the op lists a simulation builds: ``pp`` stages x ``microbatches`` <= :data:`MAX_PIPELINE_CELLS`."""
    check_int("pp", pp, maximum=MAX_PIPELINE_CELLS)
    check_int(name, microbatches)
    if pp * microbatches > MAX_PIPELINE_CELLS:
        raise ConfigError(
            f"{pp} pipeline stages x {_show(microbatches)} micro-batches is more than the {MAX_PIPELINE_CELLS:,} stage "
            f"micro-batches the simulator runs in one step; use fewer micro-batches (a larger micro-batch, or more DP)"
        )


def check_pipeline_depth(pp: int, microbatches: int, schedule: str) -> None:
    """Bound the simulations a plan runs: a step longer than :data:`MAX_PIPELINE_CELLS` is extrapolated from
    simulations of about ``microbatches`` (the schedule's fill + 2), which must fit themselves."""
    if pp * microbatches > MAX_PIPELINE_CELLS:
        raise ConfigError(
            f"--pp {pp} is deeper than the planner simulates: {schedule} needs {pp} x {microbatches:,} stage "
            f"micro-batches, more than {MAX_PIPELINE_CELLS:,}; use fewer pipeline stages"
        )


def check_plot(devices: int, pp: int, microbatches: int) -> None:
    """Bound a timeline plot: at most :data:`MAX_PLOT_DEVICES` rows and :data:`MAX_PLOT_CELLS` stage micro-batches."""
    if devices > MAX_PLOT_DEVICES or pp * microbatches > MAX_PLOT_CELLS:
        raise ConfigError(
            f"a timeline of {devices} devices and {pp} x {microbatches:,} stage micro-batches is too large to draw "
            f"(at most {MAX_PLOT_DEVICES} devices and {MAX_PLOT_CELLS:,}); drop --plot or simulate a shorter step"
        )


def check_model(cfg) -> None:
    """Bound the per-layer work of planning ``cfg`` (a :class:`~dsv3.config.ModelConfig`)."""
    if not isinstance(cfg.num_hidden_layers, int) or not 1 <= cfg.num_hidden_layers <= MAX_LAYERS:
        raise ConfigError(
            f"the model has {cfg.num_hidden_layers!r} decoder layers; the planner handles 1 to {MAX_LAYERS:,}"
        )
    mtp = cfg.num_nextn_predict_layers
    if not isinstance(mtp, int) or not 0 <= mtp <= MAX_MTP_LAYERS:
        raise ConfigError(f"the model has {mtp!r} MTP modules; the planner handles 0 to {MAX_MTP_LAYERS}")
    for field in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "moe_intermediate_size",
        "num_attention_heads",
        "n_routed_experts",
        "n_shared_experts",
        "num_experts_per_tok",
        "kv_lora_rank",
        "q_lora_rank",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "v_head_dim",
        "max_position_embeddings",
    ):
        value = getattr(cfg, field, None)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_COUNT:
            raise ConfigError(f"the model's {field} is {value!r}; the planner handles integers from 0 to {MAX_COUNT:,}")
    if cfg.num_attention_heads < 1 or cfg.hidden_size < 1:
        raise ConfigError("the model needs at least one attention head and a positive hidden_size to be planned")


def divisors(n: int) -> list[int]:
    """The divisors of ``n`` in increasing order, in O(sqrt(n)) steps."""
    small, large = [], []
    d = 1
    while d * d <= n:
        if n % d == 0:
            small.append(d)
            if d * d != n:
                large.append(n // d)
        d += 1
    return small + large[::-1]
