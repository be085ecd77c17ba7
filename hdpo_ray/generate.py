"""Sampling completions with Hugging Face `generate`, recording the entropy of what was sampled from.

The entropy of step t is that of the distribution the token was actually drawn from: the model's
next-token distribution after temperature and top-p, i.e. `softmax(scores_t)` where scores are
generate's processed scores. It is what ties sampling back to alpha: H-DPO with alpha < 1 should
sample from sharper distributions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sample:
    completion_ids: list[int]  # generated tokens up to and including EOS (no padding)
    entropy_sum: float  # sum over those tokens of the sampling distribution's entropy, nats
    finished: bool  # ended with EOS within max_new_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.completion_ids)


def left_pad(prompt_ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """N prompts -> input_ids (N, T) and attention_mask (N, T), padded on the left for generation."""
    width = max(len(p) for p in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, prompt in enumerate(prompt_ids):
        input_ids[row, width - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask


def entropy_of_scores(scores: torch.Tensor) -> torch.Tensor:
    """(N, V) processed logits, -inf where top-p removed a token -> (N,) entropy of softmax(scores), nats."""
    log_p = torch.log_softmax(scores.float(), dim=-1)
    p = log_p.exp()
    return -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1)


@torch.inference_mode()
def sample(
    model: torch.nn.Module,
    prompt_ids: list[list[int]],
    *,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
) -> list[Sample]:
    """One sampled completion per prompt, in order; batch b is seeded with seed + b, so a given
    prompt list, batch size and seed draw the same random numbers for every model."""
    device = next(model.parameters()).device
    samples: list[Sample] = []
    for b, start in enumerate(range(0, len(prompt_ids), batch_size)):
        input_ids, attention_mask = left_pad(prompt_ids[start : start + batch_size], pad_id)
        torch.manual_seed(seed + b)
        out = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), do_sample=True, temperature=temperature,
            top_p=top_p, top_k=0, max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id,
            output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
        tokens = out.sequences[:, input_ids.shape[1] :].cpu()  # (n, S)
        entropy = torch.stack([entropy_of_scores(s) for s in out.scores], dim=1).cpu()  # (n, S)
        for row in range(tokens.shape[0]):
            ids = tokens[row].tolist()
            finished = eos_id in ids
            length = ids.index(eos_id) + 1 if finished else len(ids)
            samples.append(Sample(ids[:length], float(entropy[row, :length].sum()), finished))
    return samples


@torch.inference_mode()
def completion_entropy(model: torch.nn.Module, prompt_ids: list[int], completions: list[list[int]], *, temperature: float, top_p: float) -> list[float]:
    """Per completion, the summed entropy (nats) of the distributions its tokens were drawn from, by one
    forward pass each: what `sample` records, for tokens sampled elsewhere (vLLM).

    The distribution at each completion position is the model's logits put through generate's own
    temperature and top-p warpers, so both paths agree exactly (tests check it on CPU).
    """
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    device = next(model.parameters()).device
    warpers = [TemperatureLogitsWarper(temperature)] + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else [])
    sums = []
    for completion in completions:
        if not completion:
            sums.append(0.0)
            continue
        ids = torch.as_tensor([prompt_ids + completion], dtype=torch.long, device=device)  # (1, P + S)
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()  # (S, V): position t predicts completion token t
        for warp in warpers:  # warpers act row by row, so the S positions can go through as a batch
            logits = warp(ids, logits)
        sums.append(float(entropy_of_scores(logits).sum()))
    return sums
