"""stability: a lab for LLM pre-training stability on megatron-core."""

import warnings

# megatron-core warns on import when the optional CUDA extensions are absent; on CPU (and with
# our local layer spec) that is the expected configuration, not news.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message=".*apex.*", module="megatron")

__version__ = "0.1.0"
