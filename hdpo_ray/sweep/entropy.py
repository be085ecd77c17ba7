"""How sharp is a trained policy? Mean per-token entropy, teacher-forced and on its own samples.

(a) teacher-forced: the policy reads the held-out chosen completions; entropy of its next-token
    distribution at each completion position, averaged over tokens.
(b) sampled: the policy completes the held-out prompts at temperature 1.0 (fixed seed, same prompts
    for every alpha); entropy of each distribution a token was drawn from, averaged over tokens.
Both use the first `num_prompts` valid eval pairs in file order, so every trial of a sweep is measured
on the same inputs.
"""

from __future__ import annotations

import torch


def eval_pairs(encoded_entry: str, limit: int) -> dict[str, list]:
    """The first `limit` valid pairs of an encoded cache entry, in (file, row) order."""
    from hdpo_ray.data.cache import read_table
    from hdpo_ray.data.prepare import valid_only

    table = read_table(encoded_entry, columns=["source_file", "source_row", "skip_reason", "prompt_ids", "chosen_ids"])
    table = valid_only(table).sort_by([("source_file", "ascending"), ("source_row", "ascending")]).slice(0, limit)
    return {"prompt_ids": table["prompt_ids"].to_pylist(), "chosen_ids": table["chosen_ids"].to_pylist()}


@torch.inference_mode()
def teacher_forced_entropy(
    model,
    prompt_ids: list[list[int]],
    chosen_ids: list[list[int]],
    pad_id: int,
    batch_size: int = 16,
    chunk_tokens: int = 1024,
) -> float:
    """Mean per-token entropy (nats) of the policy's next-token distribution over the chosen completions."""
    from hdpo_ray.data.collate import collate_completions
    from hdpo_ray.logprobs import completion_logprobs

    device = next(model.parameters()).device
    entropy, tokens = 0.0, 0
    for start in range(0, len(prompt_ids), batch_size):
        batch = collate_completions(
            prompt_ids[start : start + batch_size], chosen_ids[start : start + batch_size], pad_id
        )
        stats = completion_logprobs(
            model, **{k: v.to(device) for k, v in batch.items()}, chunk_tokens=chunk_tokens, with_entropy=True
        )
        entropy += stats.entropy_sum.sum().item()
        tokens += int(stats.num_tokens.sum())
    return entropy / max(tokens, 1)


def measure_policy_entropy(
    model_dir: str,
    encoded_entry: str,
    *,
    num_prompts: int,
    max_new_tokens: int,
    seed: int,
    use_gpu: bool,
    torch_threads: int,
) -> dict[str, float]:
    """Both entropy measures of the model in model_dir on the eval split's first num_prompts pairs."""
    from hdpo_ray.generate import sample
    from hdpo_ray.models import load_causal_lm, load_tokenizer

    torch.set_num_threads(torch_threads)
    device = torch.device("cuda" if use_gpu else "cpu")
    model = load_causal_lm(model_dir, dtype=torch.bfloat16 if use_gpu else torch.float32).to(device).eval()
    tokenizer = load_tokenizer(model_dir)
    pairs = eval_pairs(encoded_entry, num_prompts)
    forced = teacher_forced_entropy(model, pairs["prompt_ids"], pairs["chosen_ids"], tokenizer.pad_token_id)
    samples = sample(
        model,
        pairs["prompt_ids"],
        eos_id=tokenizer.eos_token_id,
        pad_id=tokenizer.pad_token_id,
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        seed=seed,
    )
    sampled_tokens = sum(s.num_tokens for s in samples)
    return {
        "entropy/teacher_forced": forced,
        "entropy/sampled": sum(s.entropy_sum for s in samples) / max(sampled_tokens, 1),
        "entropy/sampled_tokens": sampled_tokens,
        "entropy/sampled_finished": sum(s.finished for s in samples) / max(len(samples), 1),
        "entropy/prompts": len(samples),
    }
