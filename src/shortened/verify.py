"""The self-check of every saved model: reload the folder with plain transformers and compare.

A pruned or healed model is published only if ``AutoModelForCausalLM.from_pretrained`` rebuilds it with
exactly the saved weights (no missing, unexpected or mis-shaped tensor) and, when it fits in memory, the
reloaded model's logits on a few tokens equal those of the model in memory, and decoding token by token
with the model's own KV cache (greedy ``generate``) gives the logits of one forward over the same tokens (the
logits, not greedy tokens, which flip on near-ties). Any difference is a ShortenedError naming it, raised
before the folder is moved into place, so nothing that loads wrong is ever written.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ShortenedError

#: How far reloaded logits may be from the in-memory ones (absolute, fp32; scaled for half precision).
LOGITS_TOLERANCE = 1e-4
_PROMPT = 16
_DECODE_STEPS = 3


def verify_saved(folder: str | os.PathLike, model: nn.Module, *, trust_remote_code: bool = False,
                 seed: int = 0) -> dict[str, Any]:
    """Check that the model saved in ``folder`` reloads equal to ``model`` (in memory); return what was
    checked. Raises ShortenedError naming the first difference."""
    from .offload import disk_blocks

    folder = Path(folder)
    start = time.perf_counter()
    report: dict[str, Any] = {}
    why_not = None if disk_blocks(model) is None else "its blocks are on disk"
    why_not = why_not or _spread_over_devices(model) or _too_large(model)
    if why_not is None:
        report.update(_reload_and_compare(folder, model, trust_remote_code, seed))
    else:
        _check_keys_from_headers(folder, model, trust_remote_code)
        report.update(weights="exactly the saved tensors (names and shapes, from the files)",
                      logits=f"not compared: {why_not}")
    report["seconds"] = round(time.perf_counter() - start, 3)
    return report


def _spread_over_devices(model: nn.Module) -> str | None:
    devices = {str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}
    return f"it is spread over {len(devices)} devices" if len(devices) > 1 else None


def _too_large(model: nn.Module) -> str | None:
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    device = _device(model)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = _available_ram()
    if free is not None and need * 1.2 > free:
        return f"a second copy ({need / 2**30:.1f} GiB) does not fit in the free memory ({free / 2**30:.1f} GiB)"
    return None


def _available_ram() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _reload_and_compare(folder: Path, model: nn.Module, trust_remote_code: bool, seed: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    attn = getattr(model.config, "_attn_implementation", None)
    kwargs: dict[str, Any] = dict(dtype=dtype, output_loading_info=True, trust_remote_code=trust_remote_code,
                                  use_safetensors=True)
    if attn:
        kwargs["attn_implementation"] = attn
    try:
        with _no_progress_bars():
            reloaded, info = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except Exception as exc:  # any failure to load is what the check is for
        raise ShortenedError(f"the saved model does not load with AutoModelForCausalLM.from_pretrained: "
                             f"{_first_line(exc)}") from exc
    _check_loading_info(info)
    device = _device(model)
    reloaded.to(device).eval()
    prompt, special = _random_prompt(model, seed)
    # One greedy generation with the reloaded model's own KV cache, then one forward of each model over the
    # generated sequence: the weights are read as few times as possible (on a CPU each pass reads them all).
    try:
        steps, sequence, failure = *_generate(reloaded, prompt, special), None
    except Exception as exc:  # compared below, after the logits: their difference is the likelier cause
        steps, sequence, failure = [], prompt, exc
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model(sequence, use_cache=False).logits.float()
            got = reloaded(sequence, use_cache=False).logits.float()
    finally:
        model.train(was_training)
    if got.shape != expected.shape:
        raise ShortenedError(f"the reloaded model's logits have shape {tuple(got.shape)}, the model in memory's "
                             f"{tuple(expected.shape)}")
    diff = (got - expected).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    tolerance = LOGITS_TOLERANCE if dtype == torch.float32 else 1e-2 * scale
    if not diff <= tolerance:
        raise ShortenedError(f"the saved model reloads different from the model in memory: logits differ by "
                             f"{diff:.3g} (tolerance {tolerance:.0e}); a per-block config field was not rewritten "
                             "for this architecture")
    if failure is not None:
        raise ShortenedError(f"the saved model cannot generate with its KV cache: {_first_line(failure)}") from failure
    cache_diff = _step_difference(steps, got, _PROMPT)
    cache_tolerance = max(tolerance, 1e-3 * scale)
    if not cache_diff <= cache_tolerance:
        own, _ = _cache_difference(model, prompt, special)
        why = (" (so does the model in memory: this family's KV cache in transformers does not reproduce its "
               "own forward, so the check cannot vouch for the cache)" if not own <= cache_tolerance else "")
        raise ShortenedError(f"the saved model decodes differently with its KV cache than without it: logits "
                             f"differ by {cache_diff:.3g} (tolerance {cache_tolerance:.0e}){why}")
    del reloaded
    return {"weights": "exactly the saved tensors (reloaded)", "logits_max_abs_diff": diff,
            "logits_tolerance": tolerance, "tokens": int(sequence.shape[1]),
            "kv_cache": f"{_DECODE_STEPS} greedy tokens generated with the KV cache: logits match the full forward "
                        f"(max abs diff {cache_diff:.3g})"}


def check_source_cache(model: nn.Module, seed: int = 0) -> None:
    """Refuse, before any work, a model whose own KV-cache decoding does not reproduce its forward (a defect
    of its family's implementation, before any pruning): the self-check of the pruned model would fail on it
    after the work. Models with their blocks on disk or spread over devices are not run here."""
    from .offload import disk_blocks

    if disk_blocks(model) is not None or _spread_over_devices(model):
        return
    prompt, special = _random_prompt(model, seed)
    was_training = model.training
    model.eval()
    try:
        diff, scale = _cache_difference(model, prompt, special)
    except Exception as exc:  # noqa: BLE001 - any failure to decode with the cache is the family's
        raise ShortenedError(f"this {model.config.model_type} model cannot generate with its own KV cache in "
                             f"transformers (before any pruning): {_first_line(exc)}") from exc
    finally:
        model.train(was_training)
    tolerance = max(LOGITS_TOLERANCE, 1e-3 * scale)
    if not diff <= tolerance:
        raise ShortenedError(f"this {model.config.model_type} model decodes differently with its own KV cache than "
                             f"without it in transformers (logits differ by {diff:.3g}, before any pruning), so a "
                             "pruned copy could not be verified")


def _random_prompt(model: nn.Module, seed: int) -> tuple[torch.Tensor, list[int]]:
    """``_PROMPT`` seeded random token ids on the model's device, none of them special (pad, bos, eos: some
    families derive positions from where the padding is), and the special ids."""
    vocab = model.get_input_embeddings().num_embeddings
    special = _special_ids(model.config)
    prompt = torch.randint(0, vocab, (1, _PROMPT), generator=torch.Generator().manual_seed(seed))
    for i in special:
        prompt[prompt == i] = (i + len(special) + 1) % vocab
    return prompt.to(_device(model)), special


def _cache_difference(model: nn.Module, prompt: torch.Tensor, special: list[int]) -> tuple[float, float]:
    """:func:`_step_difference` of greedy generation with ``model``'s own KV cache against one forward over
    the generated sequence, and the scale of those logits (their largest magnitude, at least 1)."""
    steps, sequence = _generate(model, prompt, special)
    with torch.no_grad():
        full = model(sequence, use_cache=False).logits.float()
    return _step_difference(steps, full, _PROMPT), max(1.0, full.abs().max().item())


def _generate(model: nn.Module, prompt: torch.Tensor, special: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Greedy generation with the model's own KV cache: the raw logits of each step and the sequence."""
    from transformers import GenerationConfig

    # Greedy, whatever sampling the model's generation config asks for; output_logits are the raw logits,
    # before any forced or suppressed token, so those do not change the comparison.
    settings = GenerationConfig(max_new_tokens=_DECODE_STEPS, do_sample=False, use_cache=True, output_logits=True,
                                return_dict_in_generate=True, pad_token_id=special[0] if special else 0)
    with torch.no_grad():
        out = model.generate(prompt, generation_config=settings, attention_mask=torch.ones_like(prompt))
    return [step.float() for step in out.logits], out.sequences


def _step_difference(steps: list[torch.Tensor], full: torch.Tensor, prompt_len: int) -> float:
    """Max abs difference between each generation step's logits and the full forward's at that position
    (greedy tokens of two runs would flip on near-ties of a random or unhealed model; these logits do not)."""
    return max((step - full[:, prompt_len - 1 + i]).abs().max().item() for i, step in enumerate(steps))


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' "Loading weights" bar would tell the user of a load they did not ask for."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _special_ids(config: Any) -> list[int]:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    found: set[int] = set()
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(text, name, None)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and v >= 0:
                found.add(v)
    return sorted(found)


def _check_loading_info(info: dict[str, Any]) -> None:
    for key, what in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"),
                      ("mismatched_keys", "of the wrong shape")):
        names = sorted(str(n) for n in (info.get(key) or ()))
        if names:
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            raise ShortenedError(f"the saved model does not reload exactly: weight {names[0]}{more} {what} "
                                 "(transformers would fill it at random or drop it)")
    errors = info.get("error_msgs") or []
    if errors:
        raise ShortenedError(f"the saved model does not reload: {_first_line(errors[0])}")


def _check_keys_from_headers(folder: Path, model: nn.Module, trust_remote_code: bool) -> None:
    """Without loading weights: the tensors in the saved files against the module tree that plain
    transformers builds from the saved config (on the meta device); tied weights may be saved once."""
    from transformers import AutoConfig

    from .structure import meta_model

    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        skeleton = meta_model(config, type(model))
        skeleton.tie_weights()  # as from_pretrained does: a tied head is saved once
    except Exception as exc:
        raise ShortenedError(f"the saved config does not build a model: {_first_line(exc)}") from exc
    saved = _saved_shapes(folder)
    expected: dict[str, tuple[int, ...]] = {}
    groups: dict[int, list[str]] = {}
    persistent = set(skeleton.state_dict(keep_vars=True))
    for name, t in list(skeleton.named_parameters(remove_duplicate=False)) + list(
            skeleton.named_buffers(remove_duplicate=False)):
        if name in persistent:
            expected[name] = tuple(t.shape)
            groups.setdefault(id(t), []).append(name)
    tied_saved = {name for names in groups.values() if any(n in saved for n in names) for name in names}
    missing = sorted(n for n in expected if n not in saved and n not in tied_saved)
    unexpected = sorted(n for n in saved if n not in expected)
    wrong = sorted(n for n in expected if n in saved and saved[n] != expected[n])
    for names, what in ((missing, "missing"), (unexpected, "unexpected"), (wrong, "of the wrong shape")):
        if names:
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            raise ShortenedError(f"the saved model does not reload exactly: weight {names[0]}{more} {what}")


def _saved_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    files = (sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
             if index.is_file() else sorted(folder.glob("*.safetensors")))
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def _first_line(exc: BaseException | str) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
