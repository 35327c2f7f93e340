"""Parallelism applied to a built single-device model: pipeline schedules, expert and data parallelism.

Nothing here is imported by ``import dsv3``; the pure-Python pieces (pipeline
schedules) import no torch, so the planner can use them.
"""
