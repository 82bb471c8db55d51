"""The optimizer: AdamW over parameter groups, megatron's LR schedule, global-norm clipping
(``adamw.py``), and the ``optim`` config section (``config.py``, importable without torch)."""
