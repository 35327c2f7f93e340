"""Memory savings of the DeepSeek-V3 recipe (report section 3.2.3), each measurable.

``ema``: :class:`~dsv3.memory.ema.CPUEMA`, the parameter EMA kept in CPU memory
and updated by a background thread. ``recompute``: the recomputation policies.
``accumulate``: the routed experts' weight gradients added into ``.grad`` in place
over the micro-batches. BF16 optimizer moments live with the optimizer
(:class:`dsv3.train.optim.AdamW`, ``moments_dtype``).
"""
