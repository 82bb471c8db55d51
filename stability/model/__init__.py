"""megatron-core GPTModel from ModelConfig, with our submodules where megatron lacks a knob.

``build.py`` builds the model, ``layers.py``/``attention.py`` are our submodules in megatron's
layer specs, ``loss.py`` the objective, ``config.py`` the ``model`` and ``loss`` config sections
(importable without torch, so the command line stays fast).
"""
