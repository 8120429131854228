"""Run inside vLLM's own environment (``make vllm``): greedy generation for prompts given as token ids.

    VLLM_PYTHON vllm_worker.py REQUEST.json RESULT.json     one batch of generations, then exit
    VLLM_PYTHON vllm_worker.py --serve REQUEST.json         load once, then time generations on request

It imports nothing from shortened (vLLM pins its own transformers), only vLLM and the standard library; no
module beside it may be named vllm (the script's folder comes first on the import path).
REQUEST: {"model": folder, "prompts": [[ids]], "max_tokens": n, "dtype": "float32", "max_model_len": n,
"repeats": r}; RESULT: {"tokens": [[ids]], "seconds": [per repeat], "vllm": version}.

Serving, each line on standard input is a JSON call, {"batch": b, "max_tokens": n} (the first b prompts,
n tokens each, EOS ignored) or {"stop": true}; each answer is one standard-output line starting with
``REPLY`` and holding {"seconds": s, "lengths": [tokens made]} (vLLM's own logs go around it).
"""

import json
import sys
import time

REPLY = "@@shortened-vllm "


def _load(request):
    from vllm import LLM

    return LLM(model=request["model"], dtype=request.get("dtype", "float32"), seed=0, enforce_eager=True,
               max_model_len=request.get("max_model_len", 1024), gpu_memory_utilization=request.get("memory", 0.25),
               max_num_seqs=max(len(request["prompts"]), 1))


def _generate(llm, prompts, max_tokens):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False)
    return time.perf_counter() - start, outputs


def serve(request) -> int:
    import vllm

    llm = _load(request)
    print(REPLY + json.dumps({"vllm": vllm.__version__}), flush=True)
    for line in sys.stdin:
        call = json.loads(line)
        if call.get("stop"):
            break
        seconds, outputs = _generate(llm, request["prompts"][: call["batch"]], call["max_tokens"])
        print(REPLY + json.dumps({"seconds": seconds, "lengths": [len(o.outputs[0].token_ids) for o in outputs]}),
              flush=True)
    return 0


def main() -> int:
    if sys.argv[1] == "--serve":
        return serve(json.loads(open(sys.argv[2]).read()))
    request = json.loads(open(sys.argv[1]).read())
    import vllm

    llm = _load(request)
    seconds, outputs = [], None
    for _ in range(max(1, request.get("repeats", 1))):
        elapsed, outputs = _generate(llm, request["prompts"], request["max_tokens"])
        seconds.append(elapsed)
    result = {"tokens": [list(o.outputs[0].token_ids) for o in outputs], "seconds": seconds,
              "vllm": vllm.__version__}
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
