"""Training: data and tokenizer (``data``, ``tokenizer``), optimizer and schedule, the loop, metrics, plots.

Import the submodules directly (``from dsv3.train.data import build_data``); this
package imports nothing on its own so ``import dsv3.train`` stays cheap.
"""
