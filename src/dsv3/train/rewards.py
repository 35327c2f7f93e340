"""GRPO rewards: user functions, the rule-based built-ins (math, format, code) and their weighted sum.

A reward function is ``f(prompts: list[str], completions: list[str], **columns) -> list[float | None]``,
called once per batch with one entry per completion; None means "not applicable" and adds nothing. The
columns a function needs are its parameters after ``completions`` without a default
(:attr:`RewardSet.required_columns`, checked before training). A spec (``--reward``) is a built-in name,
``module:function`` or ``path/to/file.py:function``; ``code`` runs in :mod:`dsv3.train.sandbox`. The total of
a completion is sum_f w_f r_f over the functions that returned a number (0.0 when none did).
Details: docs/rl.md ("Rewards", "Module notes").
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from dsv3.errors import ConfigError, DataError, DsV3Error, TrainingError
from dsv3.train.reward_model import load_reward_model
from dsv3.train.sandbox import isolation_level, run_python

__all__ = [
    "RewardFn",
    "RewardResult",
    "RewardSet",
    "BUILTIN_REWARDS",
    "math_reward",
    "format_reward",
    "code_reward",
    "extract_final_answer",
    "extract_code",
    "R1_FORMAT",
]

RewardFn = Callable[..., Sequence[Any]]

R1_FORMAT = r"<think>.*?</think>\s*<answer>.*?</answer>"
"""DeepSeek-R1's response format (the default ``format`` pattern)."""

_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?(?:\s*/\s*\d+)?")
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_FENCE = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)


# ----------------------------------------------------------------------------- answers
def _last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def extract_final_answer(completion: str) -> str | None:
    """The final answer of a completion: the last ``\\boxed{}``'s content, else its last number, else None."""
    boxed = _last_boxed(completion)
    if boxed is not None:
        return boxed.strip()
    numbers = _NUMBER.findall(completion)
    return numbers[-1].strip() if numbers else None


def _parse_number(text: str) -> float | None:
    s = _FRAC.sub(r"(\1)/(\2)", str(text)).replace("$", "").replace(",", "").replace(" ", "").strip().rstrip(".")
    s = s.replace("(", "").replace(")", "")
    try:
        if s.count("/") == 1:
            num, den = s.split("/")
            return float(num) / float(den)
        return float(s)
    except (ValueError, ZeroDivisionError):
        return None


def _same_answer(given: str, answer: Any) -> bool:
    a, b = _parse_number(given), _parse_number(answer)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    norm = lambda s: re.sub(r"\s+|\$", "", str(s)).rstrip(".").lower()  # noqa: E731
    return norm(given) == norm(answer)


def math_reward(prompts: list[str], completions: list[str], answer: list[Any], **_: Any) -> list[float | None]:
    """1.0 where the completion's final answer equals ``answer``, 0.0 where not, None where answer is None."""
    out: list[float | None] = []
    for completion, want in zip(completions, answer):
        if want is None:
            out.append(None)
            continue
        got = extract_final_answer(completion)
        out.append(float(got is not None and _same_answer(got, want)))
    return out


# ----------------------------------------------------------------------------- format
def _compile(pattern: str, where: str) -> re.Pattern:
    try:
        return re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise (ConfigError if where == "option" else DataError)(
            f"the format pattern {pattern!r} ({where}) is not a regular expression: {e}"
        ) from None


def make_format_reward(pattern: str = R1_FORMAT) -> RewardFn:
    """The ``format`` reward with ``pattern`` as the default (a row's ``format`` column overrides it)."""
    default = _compile(pattern, "option")

    def format_reward(
        prompts: list[str], completions: list[str], format: list[Any] | None = None, **_: Any
    ) -> list[float | None]:
        rows = format if format is not None else [None] * len(completions)
        return [
            float((default if p is None else _compile(p, "format column")).fullmatch(c.strip()) is not None)
            for c, p in zip(completions, rows)
        ]

    return format_reward


format_reward = make_format_reward()


# ----------------------------------------------------------------------------- code
def extract_code(completion: str) -> str:
    """The last fenced code block of a completion (```` ```python ... ``` ````), else the whole completion."""
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else completion


def code_reward(
    prompts: list[str],
    completions: list[str],
    tests: list[Any],
    *,
    time_limit: float = 5.0,
    memory_mb: int = 512,
    **_: Any,
) -> list[float | None]:
    """1.0 where the completion's code followed by ``tests`` exits 0 in the sandbox, else 0.0; None without tests.

    Programs run in parallel (up to 4 at a time), each in its own sandbox (:func:`dsv3.train.sandbox.run_python`).
    """

    def one(pair: tuple[str, Any]) -> float | None:
        completion, test = pair
        if test is None or not str(test).strip():
            return None
        result = run_python(
            extract_code(completion) + "\n\n" + str(test) + "\n", time_limit=time_limit, memory_mb=memory_mb
        )
        return float(result.ok)

    isolation_level()  # probe once, before the threads (and fail with one line when no sandbox can start)
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        return list(pool.map(one, zip(completions, tests)))


BUILTIN_REWARDS: dict[str, RewardFn] = {"math": math_reward, "format": format_reward, "code": code_reward}


# ----------------------------------------------------------------------------- resolving specs
def _import_function(spec: str) -> RewardFn:
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ConfigError(
            f"reward {spec!r} is neither a built-in ({', '.join(BUILTIN_REWARDS)}) nor "
            f"module:function or path.py:function"
        )
    try:
        if where.endswith(".py"):
            if not os.path.isfile(where):
                raise ConfigError(f"reward {spec!r}: the file {where} does not exist")
            mod_name = f"dsv3_reward_{abs(hash(os.path.abspath(where)))}"
            mod_spec = importlib.util.spec_from_file_location(mod_name, where)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[mod_name] = module
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ConfigError:
        raise
    except BaseException as e:  # noqa: BLE001 - any failure of user code at import is the user's error
        raise ConfigError(f"reward {spec!r}: {where} does not import ({type(e).__name__}: {e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"reward {spec!r}: {where} has no function {name!r}")
    return fn


def resolve_reward(spec: str) -> tuple[str, RewardFn]:
    """(name, function) for one spec: a built-in, ``format=REGEX``, ``module:function`` or ``file.py:function``."""
    spec = spec.strip()
    if spec in BUILTIN_REWARDS:
        return spec, BUILTIN_REWARDS[spec]
    if spec.startswith("format="):
        return "format", make_format_reward(spec[len("format=") :])
    return spec, _import_function(spec)


def required_columns_of(fn: RewardFn) -> list[str]:
    """The columns a reward function needs: its parameters after (prompts, completions) without a default."""
    params = list(inspect.signature(fn).parameters.values())[2:]
    return [
        p.name
        for p in params
        if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


# ----------------------------------------------------------------------------- the set
@dataclass
class RewardResult:
    """The rewards of one batch of B completions.

    Attributes:
        total: [B] float32, sum_f w_f r_f over the functions that returned a number (0.0 where none did).
        per_function: each function's raw (unweighted) rewards, None where it did not apply.
    """

    total: torch.Tensor
    per_function: dict[str, list[float | None]]


def _checked(name: str, out: Any, batch: int) -> list[float | None]:
    if hasattr(out, "tolist") and not isinstance(out, list):  # a torch tensor or a numpy array
        out = out.tolist()
    if isinstance(out, (str, bytes)) or not isinstance(out, Sequence) or len(out) != batch:
        got = f"{len(out)} values" if isinstance(out, Sequence) else f"a {type(out).__name__}"
        raise TrainingError(
            f"reward function {name!r} returned {got} for {batch} completions; it must return "
            f"a list with one float or None per completion"
        )
    values: list[float | None] = []
    for v in out:
        if v is not None and (isinstance(v, (str, bytes)) or not math.isfinite(float(v))):
            raise TrainingError(f"reward function {name!r} returned {v!r}; rewards must be finite numbers or None")
        values.append(None if v is None else float(v))
    return values


class RewardSet:
    """Named reward functions with weights, called on a batch of completions (see the module docstring)."""

    def __init__(self, functions: list[tuple[str, RewardFn]], weights: list[float] | None = None):
        if not functions:
            raise ConfigError(
                "no reward functions were given; pass --reward NAME (math, code, format, "
                "module:function) or --reward-model RUN_DIR"
            )
        names = [n for n, _ in functions]
        if len(set(names)) != len(names):
            raise ConfigError(f"reward functions are named twice in {', '.join(names)}; name each once")
        weights = [1.0] * len(functions) if weights is None else [float(w) for w in weights]
        if len(weights) != len(functions):
            raise ConfigError(
                f"{len(weights)} reward weights were given for {len(functions)} reward functions "
                f"({', '.join(names)}); give one weight per function"
            )
        self.functions, self.weights = functions, weights

    @classmethod
    def from_specs(
        cls, specs: list[str], weights: list[float] | None = None, reward_model: str | None = None
    ) -> "RewardSet":
        """Resolve ``--reward`` specs (and a ``--reward-model`` run directory, weighted last) into a set."""
        functions = [resolve_reward(s) for s in specs]
        if reward_model is not None:
            functions.append(("reward_model", load_reward_model(reward_model).reward_fn()))
        if weights is not None and reward_model is not None and len(weights) == len(specs):
            weights = list(weights) + [1.0]
        return cls(functions, weights)

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.functions]

    @property
    def required_columns(self) -> list[str]:
        """The data columns the functions need, sorted (check them before training starts)."""
        return sorted({c for _, fn in self.functions for c in required_columns_of(fn)})

    def check_columns(self, available: Sequence[str], source: str = "the prompt data") -> None:
        """Raise a one-line :class:`DataError` naming the first function whose column ``source`` lacks."""
        for name, fn in self.functions:
            missing = [c for c in required_columns_of(fn) if c not in available]
            if missing:
                raise DataError(
                    f"reward function {name!r} needs the column {missing[0]!r}, which {source} does "
                    f"not have (columns: {', '.join(available) or 'none'})"
                )

    def __call__(self, prompts: list[str], completions: list[str], columns: dict[str, list]) -> RewardResult:
        """Score B completions; ``columns`` holds one value per completion for each data column."""
        batch = len(completions)
        if len(prompts) != batch or any(len(v) != batch for v in columns.values()):
            raise DataError(
                f"rewards got {len(prompts)} prompts, {batch} completions and columns of lengths "
                f"{sorted({len(v) for v in columns.values()})}; give one of each per completion"
            )
        self.check_columns(list(columns))
        total = [0.0] * batch
        per_function: dict[str, list[float | None]] = {}
        for (name, fn), weight in zip(self.functions, self.weights):
            try:
                out = fn(list(prompts), list(completions), **columns)
            except DsV3Error:
                raise
            except Exception as e:  # noqa: BLE001 - user code: one line naming the function
                raise TrainingError(
                    f"reward function {name!r} raised {type(e).__name__}: {' '.join(str(e).split())}"
                ) from e
            values = per_function[name] = _checked(name, out, batch)
            total = [t if v is None else t + weight * v for t, v in zip(total, values)]
        return RewardResult(torch.tensor(total, dtype=torch.float32), per_function)
