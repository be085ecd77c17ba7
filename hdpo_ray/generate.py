"""Sampling completions with Hugging Face `generate`, recording the entropy of what was sampled from.

The entropy of step t is that of the distribution the token was actually drawn from: the model's
next-token distribution after temperature and top-p, i.e. `softmax(scores_t)` where scores are
generate's processed scores. It is what ties sampling back to alpha: H-DPO with alpha < 1 should
sample from sharper distributions. Temperature 0 is greedy decoding (argmax, no randomness); its entropy is
that of the model's own next-token distribution along the greedy path (a point mass's 0 would say nothing).
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
    prompt list, batch size and seed draw the same random numbers for every model. temperature 0: greedy,
    exactly `generate(do_sample=False)`.

    Only temperature and top-p shape the distribution: the model's own generation_config (a repetition
    penalty, min_p, ... shipped with many chat models) is set aside while sampling, so what is drawn and
    its entropy are the model's, as the vLLM path and `completion_entropy` see them.
    """
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    samples: list[Sample] = []
    own_config, model.generation_config = model.generation_config, GenerationConfig()
    try:
        for b, start in enumerate(range(0, len(prompt_ids), batch_size)):
            samples.extend(
                _sample_batch(
                    model,
                    prompt_ids[start : start + batch_size],
                    device,
                    seed + b,
                    eos_id,
                    pad_id,
                    max_new_tokens,
                    temperature,
                    top_p,
                )
            )
    finally:
        model.generation_config = own_config
    return samples


def _sample_batch(
    model,
    prompt_ids: list[list[int]],
    device,
    seed: int,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
) -> list[Sample]:
    input_ids, attention_mask = left_pad(prompt_ids, pad_id)
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if temperature else {}
    out = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        **sampling,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        output_scores=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[:, input_ids.shape[1] :].cpu()  # (n, S)
    entropy = torch.stack([entropy_of_scores(s) for s in out.scores], dim=1).cpu()  # (n, S)
    samples = []
    for row in range(tokens.shape[0]):
        ids = tokens[row].tolist()
        finished = eos_id in ids
        length = ids.index(eos_id) + 1 if finished else len(ids)
        samples.append(Sample(ids[:length], float(entropy[row, :length].sum()), finished))
    return samples


@torch.inference_mode()
def completion_entropy(
    model: torch.nn.Module,
    prompt_ids: list[int],
    completions: list[list[int]],
    *,
    temperature: float,
    top_p: float,
    pad_id: int = 0,
    batch_size: int = 8,
) -> list[float]:
    """Per completion of one prompt, the summed entropy (nats) of the distributions its tokens were drawn
    from, by teacher forcing: what `sample` records, for tokens sampled elsewhere (vLLM).

    The distribution at each completion position is the model's logits put through transformers' own
    temperature and top-p warpers, as in `generate` (tests check agreement to 1e-4 on CPU); at temperature 0
    (greedy) the model's own distribution, as greedy `generate` scores it. Completions
    go through in right-padded batches of `batch_size`: (b, P + S_max) ids -> (b, P + S_max, V) logits.
    """
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    device = next(model.parameters()).device
    warpers = (  # greedy (temperature 0): nothing reshapes the distribution
        [TemperatureLogitsWarper(temperature)] + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else [])
        if temperature
        else []
    )
    sums = [0.0] * len(completions)
    todo = [i for i, c in enumerate(completions) if c]  # an empty completion drew nothing
    for start in range(0, len(todo), batch_size):
        rows = todo[start : start + batch_size]
        width = len(prompt_ids) + max(len(completions[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):  # right padding: a causal model's logits before the padding are unchanged
            sequence = prompt_ids + completions[i]
            input_ids[r, : len(sequence)] = torch.as_tensor(sequence)
            attention_mask[r, : len(sequence)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        for r, i in enumerate(rows):
            scores = logits[
                r, len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(completions[i])
            ].float()  # (S_i, V): position t predicts token t
            for warp in warpers:  # warpers act row by row, so the S_i positions go through as a batch
                scores = warp(input_ids[r : r + 1], scores)
            sums[i] = float(entropy_of_scores(scores).sum())
    return sums
