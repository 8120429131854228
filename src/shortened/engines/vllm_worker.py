"""Run inside vLLM's own environment (``make vllm``): greedy generation for prompts given as token ids.

    VLLM_PYTHON vllm_worker.py REQUEST.json RESULT.json

It imports nothing from shortened (vLLM pins its own transformers), only vLLM and the standard library; no
module beside it may be named vllm (the script's folder comes first on the import path).
REQUEST: {"model": folder, "prompts": [[ids]], "max_tokens": n, "dtype": "float32", "max_model_len": n,
"repeats": r}; RESULT: {"tokens": [[ids]], "seconds": [per repeat], "vllm": version}.
"""

import json
import sys
import time


def main() -> int:
    request = json.loads(open(sys.argv[1]).read())
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=request["model"], dtype=request.get("dtype", "float32"), seed=0, enforce_eager=True,
              max_model_len=request.get("max_model_len", 1024), gpu_memory_utilization=request.get("memory", 0.25))
    params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]]
    seconds, outputs = [], None
    for _ in range(max(1, request.get("repeats", 1))):
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds.append(time.perf_counter() - start)
    result = {"tokens": [list(o.outputs[0].token_ids) for o in outputs], "seconds": seconds,
              "vllm": vllm.__version__}
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
