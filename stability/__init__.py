"""stability: a lab for LLM pre-training stability on megatron-core."""

import logging
import warnings

# megatron-core warns on import when the optional CUDA extensions are absent; on CPU (and with
# our local layer spec) that is the expected configuration, not news.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message=".*apex.*", module="megatron")
# megatron-core 0.16 warns about its own default cuda_graph_scope whenever a config is built.
warnings.filterwarnings("ignore", message="full scope is deprecated")
# megatron-core logs every dataset index it builds or loads at INFO; keep its warnings.
logging.getLogger("megatron.core").setLevel(logging.WARNING)

__version__ = "0.1.0"
