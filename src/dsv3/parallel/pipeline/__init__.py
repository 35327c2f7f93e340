"""Pipeline parallelism: schedules as data (``schedules``), executed by the planner's simulator and the runtime."""

from dsv3.parallel.pipeline.schedules import SCHEDULES, Op, Schedule, ScheduleError, build_schedule, validate_schedule

__all__ = ["SCHEDULES", "Op", "Schedule", "ScheduleError", "build_schedule", "validate_schedule"]
