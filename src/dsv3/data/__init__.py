"""The data: documents -> tokens -> packed rows -> batches, for pre-training, SFT and GRPO.

``sources`` (CorpusSpec, DataSource: what to read), ``tokenizer`` (BPE training, loading),
``tokens`` (tokenise and cache), ``packing`` (windows, conversations into rows), ``loader``
(resumable order, batches), ``pretrain`` (build_data), ``chat`` (templates, loss masks),
``sft`` (build_sft_data), ``rl_prompts`` (GRPO prompts). Nothing here imports ``dsv3.train``.
Import the submodules directly; this package imports nothing on its own.
"""
