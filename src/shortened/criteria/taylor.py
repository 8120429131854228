"""``taylor``: sum over the block's parameters of ``|w * dL/dw|`` (Shortened LLaMA's Taylor+ criterion).

``L`` is the mean next-token loss over all calibration tokens. The gradient is computed block by block,
backwards, from the engine's cached block inputs: the head's gradient with respect to the last hidden
state first (in token chunks, so full logits never exist), then each block is re-run on its cached input
and differentiated against the gradient arriving from above. Only one block's activations and one
block's gradients exist at any time; each block's ``|w * g|`` is summed as soon as its gradient is
complete and the gradient is dropped. Embeddings and head are not scored.
"""

from __future__ import annotations

from typing import Any

import torch

from ..engine import Engine, call_block, token_nll


def score(engine: Engine) -> tuple[list[float], dict[str, Any]]:
    caps = engine.captures
    hiddens = engine.dense_hiddens("all")  # per micro-batch: inputs of the active blocks, then the output
    n_targets = engine.num_targets()
    k = len(engine.active)

    # dL/dh at the last block's output, chunk by chunk over tokens.
    grads: list[torch.Tensor] = []
    loss_total = 0.0
    for m, cap in enumerate(caps):
        out = hiddens[m][k]
        g = torch.zeros_like(out)
        ids = cap.ids
        b, seq = ids.shape
        x_all = out[:, :-1].reshape(-1, out.shape[-1])
        t_all = ids[:, 1:].reshape(-1)
        g_flat = torch.zeros_like(x_all)
        for s in range(0, x_all.shape[0], engine.loss_chunk):
            x = x_all[s:s + engine.loss_chunk].detach().requires_grad_(True)
            with torch.enable_grad():
                logits = engine.head(x).float()
                t = t_all[s:s + engine.loss_chunk]
                loss = token_nll(logits, t).sum() / n_targets
                (gx,) = torch.autograd.grad(loss, [x])
            loss_total += float(loss.detach())
            g_flat[s:s + engine.loss_chunk] = gx
        g[:, :-1] = g_flat.view(b, seq - 1, -1)
        grads.append(g)
        hiddens[m][k] = None  # type: ignore[call-overload]  # free

    scores = [0.0] * k
    with engine.progress_bar(k, "taylor") as bar:
        for pos in reversed(range(k)):
            j = engine.active[pos]
            with engine.on_device(j) as block:
                params = [p for p in block.parameters()]
                saved = [p.requires_grad for p in params]
                for p in params:
                    p.requires_grad_(True)
                acc: list[torch.Tensor | None] = [None] * len(params)
                try:
                    for m, cap in enumerate(caps):
                        x = hiddens[m][pos].detach().requires_grad_(pos > 0)
                        with torch.enable_grad():
                            y = call_block(block, cap.calls[j], x, cap.batch)
                            wrt = ([x] if pos > 0 else []) + params
                            got = torch.autograd.grad(y, wrt, grad_outputs=grads[m], allow_unused=True)
                        if pos > 0:
                            grads[m] = got[0]
                            got = got[1:]
                        hiddens[m][pos] = None  # type: ignore[call-overload]
                        for q, gp in enumerate(got):
                            if gp is not None:
                                acc[q] = gp if acc[q] is None else acc[q] + gp
                    total = torch.zeros((), dtype=torch.float64)
                    for p, gp in zip(params, acc):
                        if gp is not None:
                            total += (p.detach() * gp).abs().double().sum().cpu()
                    scores[pos] = float(total)
                    del acc
                finally:
                    for p, r in zip(params, saved):
                        p.requires_grad_(r)
            bar.update()
    return scores, {"loss": loss_total}


from . import Criterion  # noqa: E402

CRITERION = Criterion("taylor", score, cost="gradient", needs_data=True, uses_head=True, protect=(4, 2),
                      description="sum of |w * dL/dw| over the block's parameters (first-order Taylor)")
