"""Understanding: text generation after a context, greedy or sampled (temperature, top-p), with a stop on
the end token and a maximum length.

The answer is laid out as the training packer lays out a text with loss: ``[bos] a_1 ... a_n [eos]`` at the
context's next positions. Decoding feeds ``bos`` first, then each token it picks, one token per step
into the (forked) context's cache; the logits are ``lm_head`` of the last hidden state, i.e. what the
training forward's cross entropy at that row is computed from.
"""

from __future__ import annotations

import math

import torch

from bagel.generate.context import Context, token_chunk

__all__ = ["generate_text", "pick_token", "check_sampling"]


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if (
        isinstance(top_p, bool)
        or not isinstance(top_p, (int, float))
        or not (0 < top_p <= 1)
        or math.isnan(top_p)
    ):
        raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}")


def pick_token(
    logits: torch.Tensor,
    *,
    do_sample: bool,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> int:
    """The next token from ``logits [vocab]``: the argmax, or a draw from ``softmax(logits / temperature)``
    restricted to the smallest set of most likely tokens whose probability reaches ``top_p`` (computed on
    the CPU in fp32, so that a seeded ``generator`` gives the same tokens on every device)."""
    logits = logits.detach().float().cpu()
    if not do_sample:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_p, 0) - sorted_p  # mass of the more likely tokens
        keep = before < top_p  # always keeps the first
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate_text(
    context: Context,
    *,
    max_new_tokens: int = 512,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    eos_token_id: int | None = None,
) -> list[int]:
    """Generate after ``context`` (not modified: a fork is extended). Returns the new token ids, the end
    token included when it was generated (default end token: the context's ``tokens.eos``)."""
    check_sampling(max_new_tokens, temperature, top_p)
    model = context.model
    eos = context.tokens.eos if eos_token_id is None else int(eos_token_id)
    ctx = context.fork()
    head = model.get_output_embeddings()
    token = context.tokens.bos
    out: list[int] = []
    for _ in range(max_new_tokens):
        hidden = ctx.add_chunk(token_chunk(model, token, ctx.next_position), advance=1)
        token = pick_token(
            head(hidden[-1:])[0],
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            generator=generator,
        )
        out.append(token)
        if token == eos:
            break
    return out
