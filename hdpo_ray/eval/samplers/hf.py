"""The Hugging Face `generate` backend (CPU or GPU)."""

from __future__ import annotations

from typing import Any

from hdpo_ray.data.template import fit_prompt
from hdpo_ray.eval.samplers.common import SamplingPlan, columns, completions_per_prompt, output_rows, row_seed


class HFSampler:
    """Ray Data actor: Hugging Face `generate`, num_samples completions of one prompt per call (one when greedy)."""

    rows_per_batch = 1  # each row is its own generate call (its own seed), so batching rows buys nothing

    def __init__(self, plan: dict[str, Any]):
        import torch

        from hdpo_ray.models import load_causal_lm, load_tokenizer

        self.plan = SamplingPlan(**plan)
        torch.set_num_threads(self.plan.torch_threads)
        device = torch.device("cuda" if self.plan.use_gpu else "cpu")
        dtype = torch.bfloat16 if self.plan.use_gpu else torch.float32
        self.model = (
            load_causal_lm(self.plan.model, dtype=dtype, trust_remote_code=self.plan.trust_remote_code)
            .to(device)
            .eval()
        )
        self.tokenizer = load_tokenizer(self.plan.model, self.plan.chat_template, self.plan.trust_remote_code)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        from hdpo_ray.data.template import encode_prompt
        from hdpo_ray.generate import sample

        plan, tok = self.plan, self.tokenizer
        out: list[dict[str, Any]] = []
        for row in (dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)):
            _, ids = encode_prompt(tok, [{"role": "user", "content": str(row["prompt"])}])
            ids, truncated = fit_prompt(ids, plan.max_prompt_length, tok.bos_token_id)
            temperature = float(row["temperature"])
            samples = sample(
                self.model,
                [ids] * completions_per_prompt(plan.num_samples, temperature),
                eos_id=tok.eos_token_id,
                pad_id=tok.pad_token_id,
                max_new_tokens=plan.max_new_tokens,
                temperature=temperature,
                top_p=plan.top_p,
                seed=row_seed(plan.seed, row["task"], row["problem_id"], temperature),
                batch_size=plan.num_samples,
            )
            completions = [
                {
                    "completion": tok.decode(s.completion_ids, skip_special_tokens=True),
                    "num_tokens": s.num_tokens,
                    "entropy": s.entropy_sum / max(s.num_tokens, 1),
                    "finished": s.finished,
                }
                for s in samples
            ]
            out.extend(output_rows(row, completions, len(ids), truncated))
        return columns(out)
