"""Hugging Face interop, tested against transformers itself (docs/hf.md).

- ``export``: a run's checkpoint as a transformers model folder (``stability-export hf``).
- ``load``: ``model.init_from=hf:DIR``, a transformers Llama checkpoint as initial weights.
- ``convert``: which transformers class computes our model, its config, the weights' names.
- ``tokenizer``: a SentencePiece BPE model as a ``tokenizer.json`` that encodes alike.

Importing this package is cheap; transformers, tokenizers and safetensors (the ``hf`` extra)
are imported where they are used.
"""
