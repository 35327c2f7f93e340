"""Training: the session, the loop, optimizer and schedule, metrics, plots, GRPO (the data is :mod:`dsv3.data`).

Import the submodules directly (``from dsv3.train.loop import train``); this
package imports nothing on its own so ``import dsv3.train`` stays cheap.
"""
