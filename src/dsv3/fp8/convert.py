"""Apply the FP8 recipe to a built model: swap Linears and activation callables in place.

:func:`convert` replaces every ``nn.Linear`` whose name matches ``recipe.include`` (and no
``recipe.exclude``) by an :class:`~dsv3.fp8.linear.FP8Linear` sharing its Parameters, sets ``mm`` of every
``Experts`` module to the FP8 grouped GEMM and ``act`` of every MLP / ``Experts`` to the FP8-caching SwiGLU.
Embedding, output head, router, norms and attention core stay in high precision. Conversion touches no
tensor data (it works on ``meta``) and is idempotent. Narrative: docs/fp8.md.
"""

from __future__ import annotations

import fnmatch

import torch.nn as nn

from dsv3.errors import ConfigError
from dsv3.fp8.linear import FP8GroupedMM, FP8Linear, FP8SwiGLU
from dsv3.fp8.recipe import FP8Recipe


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def is_selected(name: str, recipe: FP8Recipe) -> bool:
    """Whether the module called ``name`` falls under the recipe's FP8 scope."""
    return _matches(name, recipe.include) and not _matches(name, recipe.exclude)


def _is_experts(module: nn.Module) -> bool:
    return (
        isinstance(getattr(module, "gate_up_proj", None), nn.Parameter)
        and isinstance(getattr(module, "down_proj", None), nn.Parameter)
        and callable(getattr(module, "mm", None))
    )


def _is_mlp(module: nn.Module) -> bool:
    return all(
        isinstance(getattr(module, n, None), nn.Linear | FP8Linear) for n in ("gate_proj", "up_proj", "down_proj")
    )


def convert(model: nn.Module, recipe: FP8Recipe | None = None) -> nn.Module:
    """Make ``model`` train in FP8 following ``recipe`` (default: the report's); returns ``model``.

    Args:
        model: a DeepSeek-V3-architecture model (any device, ``meta`` included).
        recipe: the :class:`FP8Recipe`.

    Returns:
        The same ``model`` object, modified in place.

    Raises:
        ConfigError: nothing in the model matches the recipe's scope.
    """
    recipe = recipe or FP8Recipe()
    converted = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not is_selected(full, recipe):
                continue
            if isinstance(child, FP8Linear):
                child.recipe = recipe
                converted += 1
            elif type(child) is nn.Linear:
                is_attn_out = full.endswith("self_attn.o_proj")
                cache = recipe.attn_out_format if is_attn_out else "e4m3"
                setattr(module, child_name, FP8Linear(child, recipe, input_cache=cache))
                converted += 1
        if not name or not is_selected(name, recipe):
            continue
        if _is_experts(module):
            module.mm = FP8GroupedMM(recipe)
            converted += 1
        if (_is_experts(module) or _is_mlp(module)) and hasattr(module, "act"):
            if recipe.fp8_swiglu:
                module.act = FP8SwiGLU(recipe)
            elif isinstance(module.act, FP8SwiGLU):
                raise ConfigError(
                    f"{name}.act was converted to the FP8 SwiGLU before and fp8_swiglu=False cannot undo it; "
                    "convert a freshly built model instead."
                )
    if converted == 0:
        raise ConfigError(
            "fp8.convert found no nn.Linear or experts under "
            f"{', '.join(recipe.include)}; pass a DeepSeek-V3 model built by dsv3 or adjust FP8Recipe.include."
        )
    return model
