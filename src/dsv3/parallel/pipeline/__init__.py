"""Pipeline parallelism: schedules as data (``schedules``), executed by the planner's simulator and the runtime.

The runtime modules import torch and are imported explicitly (this package stays torch-free for ``dsv3 plan``):
``stages`` (the model cut into stages), ``wgrad`` (zero-bubble weight-gradient split), ``executor``
(:class:`~dsv3.parallel.pipeline.executor.PipelineRuntime`, the op-list interpreter) and ``train``
(the training step and ``dsv3 train --pp``). See docs/pipeline.md.
"""

from dsv3.parallel.pipeline.schedules import SCHEDULES, Op, Schedule, ScheduleError, build_schedule, validate_schedule

__all__ = ["SCHEDULES", "Op", "Schedule", "ScheduleError", "build_schedule", "validate_schedule"]
