"""The vLLM backend (GPU machines, optional extra `.[vllm]`): imported only when chosen.

Same contract as `HFSampler`: rows in, one row per completion out, same prompt encoding, same
per-row seeds (vLLM's per-request `SamplingParams.seed`) and parameters. vLLM returns sampled tokens,
not whole distributions, so each completion's entropy comes from one teacher-forced pass of a Hugging
Face copy of the model through `completion_entropy` (generate's own temperature/top-p warpers); the
actor therefore holds the model twice and gives vLLM `GPU_MEMORY_FRACTION` of the GPU.
"""

from __future__ import annotations

from typing import Any

from hdpo_ray.data.template import fit_prompt
from hdpo_ray.eval.samplers.common import SamplingPlan, columns, completions_per_prompt, output_rows, row_seed

GPU_MEMORY_FRACTION = 0.6


class VLLMSampler:
    rows_per_batch = 64  # vLLM batches requests itself; many rows per call keep the GPU full

    def __init__(self, plan: dict[str, Any]):
        import torch
        from vllm import LLM

        from hdpo_ray.models import load_causal_lm, load_tokenizer, resolve_model

        self.plan = SamplingPlan(**plan)
        self.tokenizer = load_tokenizer(self.plan.model, self.plan.chat_template, self.plan.trust_remote_code)
        self.llm = LLM(
            model=resolve_model(self.plan.model),
            seed=self.plan.seed,
            dtype="bfloat16",
            trust_remote_code=self.plan.trust_remote_code,
            gpu_memory_utilization=GPU_MEMORY_FRACTION,
            max_model_len=self.plan.max_prompt_length + self.plan.max_new_tokens,
        )
        self.scorer = (
            load_causal_lm(self.plan.model, dtype=torch.bfloat16, trust_remote_code=self.plan.trust_remote_code)
            .cuda()
            .eval()
        )

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from hdpo_ray.data.template import encode_prompt
        from hdpo_ray.generate import completion_entropy

        plan, tok = self.plan, self.tokenizer
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        prompts, params = [], []
        for row in rows:
            _, ids = encode_prompt(tok, [{"role": "user", "content": str(row["prompt"])}])
            prompts.append(fit_prompt(ids, plan.max_prompt_length, tok.bos_token_id))
            temperature = float(row["temperature"])
            params.append(
                SamplingParams(  # temperature 0: vLLM's greedy decoding (argmax; top_p set aside), n = 1
                    n=completions_per_prompt(plan.num_samples, temperature),
                    temperature=temperature,
                    top_p=plan.top_p if temperature else 1.0,
                    max_tokens=plan.max_new_tokens,
                    seed=row_seed(plan.seed, row["task"], row["problem_id"], temperature),
                    stop_token_ids=[tok.eos_token_id],
                )
            )
        results = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids, _ in prompts], params, use_tqdm=False)
        out: list[dict[str, Any]] = []
        for row, (ids, truncated), result, p in zip(rows, prompts, results, params, strict=True):
            tokens = [list(c.token_ids) for c in result.outputs]
            entropy = completion_entropy(
                self.scorer, ids, tokens, temperature=p.temperature, top_p=p.top_p, pad_id=tok.pad_token_id
            )
            completions = [
                {
                    "completion": tok.decode(t, skip_special_tokens=True),
                    "num_tokens": len(t),
                    "entropy": h / max(len(t), 1),
                    "finished": c.finish_reason == "stop",
                }
                for t, h, c in zip(tokens, entropy, result.outputs, strict=True)
            ]
            out.extend(output_rows(row, completions, len(ids), truncated))
        return columns(out)
