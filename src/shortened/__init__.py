"""shortened: depth pruning for Hugging Face causal language models.

The public API; each stage is usable on its own::

    from shortened import load_model, calibration_ids, score_blocks, select_blocks, remove_blocks, save_model

    model, tokenizer = load_model("smollm2-135m")
    ids = calibration_ids("self", tokenizer, model=model)          # LongTensor[10, 128]
    scores = score_blocks(model, ids, "ppl")                       # one score per block
    plan = select_blocks(scores, ratio=0.2)                        # the blocks to remove
    kept = remove_blocks(model, plan.remove)                       # in place; kept[i] = original index
"""

from .archs import ArchSpec, get_arch, get_blocks, num_blocks, supported_model_types
from .criteria import criterion_names, score_blocks
from .data import calibration_ids
from .describe import model_info
from .errors import ShortenedError
from .evaluation import evaluate
from .heal import heal
from .io import pruning_record, save_model
from .loading import load_model
from .scores import BlockScores
from .selection import PruningPlan, iterative_select, select_blocks
from .surgery import remove_blocks

__all__ = [
    "ArchSpec", "BlockScores", "PruningPlan", "ShortenedError", "calibration_ids", "criterion_names",
    "evaluate", "get_arch", "get_blocks", "heal", "iterative_select", "load_model", "model_info", "num_blocks",
    "pruning_record", "remove_blocks", "save_model", "score_blocks", "select_blocks", "supported_model_types",
]
