"""Pipeline parallelism at run time: the schedules' op lists (:mod:`dsv3.schedules`) executed over held stages.

``stages`` (the model cut into stages), ``wgrad`` (zero-bubble weight-gradient split), ``executor``
(:class:`~dsv3.parallel.pipeline.executor.PipelineRuntime`, the op-list interpreter), ``overlap`` (the FB
steps) and ``train`` (the training step and ``dsv3 train --pp``). See docs/pipeline.md.
"""
