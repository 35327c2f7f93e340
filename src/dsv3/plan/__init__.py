"""The planner behind ``dsv3 plan``: pure arithmetic over a config, no torch import."""
