"""dsv3: train and plan DeepSeek-V3-architecture Mixture-of-Experts models.

``import dsv3`` is cheap and imports no torch; the model API is loaded on first use::

    import dsv3
    model = dsv3.from_pretrained("path/to/hf_checkpoint")
"""

import importlib

from dsv3.config import ModelConfig, load_preset
from dsv3.errors import DsV3Error

__version__ = "0.1.0"

# Loaded on first use (importlib in __getattr__), so that `import dsv3` stays torch-free.
_LAZY = {
    "from_pretrained": ("dsv3.checkpoint.state", "from_pretrained"),
    "DeepseekV3ForCausalLM": ("dsv3.model.transformer", "DeepseekV3ForCausalLM"),
}


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'dsv3' has no attribute {name!r}")


__all__ = ["ModelConfig", "load_preset", "DsV3Error", "from_pretrained", "DeepseekV3ForCausalLM", "__version__"]
