"""shortened: depth pruning for Hugging Face causal language models.

The public API (each stage usable on its own)::

    from shortened import load_model, remove_blocks, save_model
    model, tokenizer = load_model("smollm2-135m")
    kept = remove_blocks(model, [20, 21, 22])
"""

from .archs import ArchSpec, get_arch, get_blocks, num_blocks, supported_model_types
from .errors import ShortenedError
from .describe import model_info
from .io import pruning_record, save_model
from .loading import load_model
from .surgery import remove_blocks

__all__ = [
    "ArchSpec", "ShortenedError", "get_arch", "get_blocks", "load_model", "model_info",
    "num_blocks", "pruning_record", "remove_blocks", "save_model", "supported_model_types",
]
