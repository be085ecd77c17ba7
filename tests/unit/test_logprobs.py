"""Unit tests for hdpo_ray.logprobs: the chunked completion log-probs against the full-logits version."""

from __future__ import annotations

import pytest
import torch

from hdpo_ray.logprobs import completion_logprobs
from tests.helpers import assert_packed_equals_padded_on_real_pairs, naive_completion_logprobs, real_pairs

VOCAB = 101
PAD = 0

# (prompt length, completion length) per row; the longest row sets T, the others are right-padded.
ROWS = [(3, 5), (5, 2), (2, 7), (4, 1)]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = LlamaForCausalLM(config).float()
    m.eval()  # no dropout, deterministic
    return m


def make_batch(rows=ROWS, seed: int = 0, pad_id: int = PAD) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = max(p + c for p, c in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (p, c) in enumerate(rows):
        input_ids[i, : p + c] = torch.randint(3, VOCAB, (p + c,), generator=g)
        attention_mask[i, : p + c] = 1
        completion_mask[i, p : p + c] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def test_batch_is_right_padded():
    batch = make_batch()
    assert batch["input_ids"].shape == (4, 9)
    # Completion tokens are real tokens after at least one prompt token.
    assert not (batch["completion_mask"] & (batch["attention_mask"] == 0)).any()
    assert not batch["completion_mask"][:, 0].any()
    assert batch["completion_mask"].sum(-1).tolist() == [c for _, c in ROWS]


@pytest.mark.parametrize("chunk_tokens", [1, 3, 1024])
def test_logps_match_naive(model, chunk_tokens):
    batch = make_batch()
    with torch.no_grad():
        stats = completion_logprobs(model, **batch, chunk_tokens=chunk_tokens)
        naive = naive_completion_logprobs(model, **batch)
    assert stats.logps.shape == (4,)
    assert stats.logps.dtype == torch.float32
    torch.testing.assert_close(stats.logps, naive, atol=1e-4, rtol=0)
    # Sanity: log-probs of a 101-way random-ish model are negative and of a plausible size.
    assert (stats.logps < 0).all()


def test_logps_match_hand_computed(model):
    """Position t-1 predicts token t: sum log softmax(logits[t-1])[token t] over completion t."""
    batch = make_batch()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        stats = completion_logprobs(model, **batch, chunk_tokens=2)
    expected = []
    for i in range(logits.shape[0]):
        total = 0.0
        for t in range(1, logits.shape[1]):
            if batch["completion_mask"][i, t]:
                total += torch.log_softmax(logits[i, t - 1], -1)[batch["input_ids"][i, t]].item()
        expected.append(total)
    torch.testing.assert_close(stats.logps, torch.tensor(expected), atol=1e-4, rtol=0)


def test_num_tokens(model):
    batch = make_batch()
    with torch.no_grad():
        stats = completion_logprobs(model, **batch)
    assert stats.num_tokens.tolist() == [c for _, c in ROWS]
    assert stats.num_tokens.tolist() == batch["completion_mask"][:, 1:].sum(-1).tolist()


@pytest.mark.parametrize("chunk_tokens", [1, 3, 1024])
def test_entropy_matches_full_softmax(model, chunk_tokens):
    batch = make_batch()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        stats = completion_logprobs(model, **batch, chunk_tokens=chunk_tokens)
    probs = torch.softmax(logits[:, :-1], dim=-1)  # position t-1 predicts token t
    token_entropy = -(probs * torch.log(probs)).sum(-1)  # (N, T-1)
    expected = (token_entropy * batch["completion_mask"][:, 1:]).sum(-1)
    torch.testing.assert_close(stats.entropy_sum, expected, atol=1e-4, rtol=0)
    # Each token's entropy is in (0, ln V].
    assert (stats.entropy_sum > 0).all()
    assert (stats.entropy_sum <= stats.num_tokens * torch.log(torch.tensor(float(VOCAB))) + 1e-4).all()


def test_without_entropy_gives_zeros(model):
    batch = make_batch()
    with torch.no_grad():
        stats = completion_logprobs(model, **batch, with_entropy=False)
        naive = naive_completion_logprobs(model, **batch)
    assert torch.equal(stats.entropy_sum, torch.zeros(4))
    torch.testing.assert_close(stats.logps, naive, atol=1e-4, rtol=0)


def _param_grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk_tokens", [1, 3, 1024])
def test_gradients_match_naive(model, chunk_tokens):
    batch = make_batch(seed=3)
    weights = torch.tensor([1.0, -0.5, 0.25, 2.0])  # a non-trivial upstream gradient per sequence

    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        stats = completion_logprobs(model, **batch, chunk_tokens=chunk_tokens)
        assert stats.logps.requires_grad
        assert not stats.entropy_sum.requires_grad
        (stats.logps * weights).sum().backward()
    chunked = _param_grads(model)

    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        (naive_completion_logprobs(model, **batch) * weights).sum().backward()
    naive = _param_grads(model)
    model.zero_grad(set_to_none=True)

    assert chunked.keys() == naive.keys()
    assert len(naive) == len(list(model.parameters()))
    for name in naive:
        torch.testing.assert_close(chunked[name], naive[name], atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    assert any(g.abs().max() > 1e-6 for g in naive.values())


def assert_same_stats(model, batch: dict, other: dict) -> None:
    """The two batches (either layout) give every sequence the same log-prob, entropy and token count."""
    with torch.no_grad():
        a = completion_logprobs(model, **batch, chunk_tokens=3)
        b = completion_logprobs(model, **other, chunk_tokens=3)
    torch.testing.assert_close(b.logps, a.logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.entropy_sum, a.entropy_sum, atol=1e-5, rtol=0)
    assert torch.equal(a.num_tokens, b.num_tokens)


def test_padding_ids_do_not_matter(model):
    batch = make_batch()
    other = {k: v.clone() for k, v in batch.items()}
    g = torch.Generator().manual_seed(7)
    padding = other["attention_mask"] == 0
    assert padding.any()
    other["input_ids"][padding] = torch.randint(3, VOCAB, (int(padding.sum()),), generator=g)
    assert not torch.equal(other["input_ids"], batch["input_ids"])
    assert_same_stats(model, batch, other)


def test_rows_are_independent(model):
    """A row's result does not depend on what else is in the batch (padding to a longer width)."""
    batch = make_batch()
    with torch.no_grad():
        full = completion_logprobs(model, **batch)
        for i, (p, c) in enumerate(ROWS):
            single = {k: v[i : i + 1, : p + c] for k, v in batch.items()}
            alone = completion_logprobs(model, **single)
            torch.testing.assert_close(alone.logps, full.logps[i : i + 1], atol=1e-4, rtol=0)


def test_completion_mask_at_position_zero_raises(model):
    batch = make_batch()
    batch["completion_mask"][1, 0] = True
    with pytest.raises(ValueError):
        completion_logprobs(model, **batch)


def test_shape_mismatch_raises(model):
    batch = make_batch()
    with pytest.raises(ValueError):
        completion_logprobs(model, batch["input_ids"], batch["attention_mask"][:, :-1], batch["completion_mask"])
    with pytest.raises(ValueError):
        completion_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"][:3])


def test_tiny_llama_default_matches_naive():
    from hdpo_ray.models import build_tiny_llama

    m = build_tiny_llama().eval()
    batch = make_batch(rows=[(4, 3), (2, 5)], seed=11)
    with torch.no_grad():
        stats = completion_logprobs(m, **batch, chunk_tokens=3)
        naive = naive_completion_logprobs(m, **batch)
    torch.testing.assert_close(stats.logps, naive, atol=1e-4, rtol=0)
    assert stats.num_tokens.tolist() == [3, 5]


def test_extra_empty_chunks_change_nothing_and_too_few_raise(model):
    """ZeRO-3 ranks pad to the same number of LM-head calls; the padding must be inert."""
    batch = make_batch()
    with torch.no_grad():
        base = completion_logprobs(model, **batch, chunk_tokens=4)
        padded = completion_logprobs(model, **batch, chunk_tokens=4, num_chunks=int(base.num_tokens.sum()) // 4 + 3)
    assert torch.allclose(base.logps, padded.logps) and torch.allclose(base.entropy_sum, padded.entropy_sum)
    with pytest.raises(ValueError, match="cannot hold"):
        completion_logprobs(model, **batch, chunk_tokens=4, num_chunks=1)


def packed_batch(rows=ROWS, seed: int = 0) -> dict[str, torch.Tensor]:
    """make_batch's sequences in collate's packed layout."""
    from hdpo_ray.data.collate import collate_completions

    padded = make_batch(rows, seed)
    sequences = [padded["input_ids"][i, : p + c].tolist() for i, (p, c) in enumerate(rows)]
    return collate_completions(
        [s[:p] for s, (p, _) in zip(sequences, rows, strict=True)],
        [s[p:] for s, (p, _) in zip(sequences, rows, strict=True)],
        PAD,
        packed=True,
    )


# ROWS (9, 7, 9, 5 tokens) share no row; SHARED packs at capacity 8 into [0], [1], [2, 3], [7, 4, 5], [6].
SHARED = [(3, 5), (2, 6), (2, 2), (1, 3), (1, 1), (1, 1), (1, 1), (2, 2)]


@pytest.mark.parametrize("rows", [ROWS, SHARED])
def test_packed_equals_padded(model, rows):
    padded, packed = make_batch(rows), packed_batch(rows)
    assert packed["input_ids"].numel() <= padded["input_ids"].numel()
    assert_same_stats(model, padded, packed)


def test_packed_gradients_equal_padded(model):
    weights = torch.linspace(-1.0, 2.0, len(SHARED))
    grads = []
    for batch in (make_batch(SHARED), packed_batch(SHARED)):
        model.zero_grad()
        (completion_logprobs(model, **batch, chunk_tokens=4).logps * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad()
    for name in grads[0]:
        torch.testing.assert_close(
            grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_a_packed_sequence_does_not_see_its_neighbour(model):
    """Changing every token of the other sequences in a row leaves this sequence's log-probs as they were."""
    batch = packed_batch(SHARED)
    assert batch["sequence_index"][3].tolist() == [7, 7, 7, 7, 4, 4, 5, 5]
    other = {k: v.clone() for k, v in batch.items()}
    neighbours = other["sequence_index"] != 4
    other["input_ids"][neighbours] = (other["input_ids"][neighbours] * 7 + 5) % (VOCAB - 3) + 3
    with torch.no_grad():
        a = completion_logprobs(model, **batch)
        b = completion_logprobs(model, **other)
    torch.testing.assert_close(a.logps[4], b.logps[4], atol=1e-6, rtol=0)
    # its neighbours did change
    assert not torch.isclose(a.logps[5], b.logps[5], atol=1e-3) and not torch.isclose(a.logps[7], b.logps[7], atol=1e-3)


def test_packing_is_exact_for_llama_but_not_for_a_model_that_ignores_positions(model):
    from hdpo_ray.logprobs import packing_is_exact

    assert packing_is_exact(model, torch.device("cpu"))
    with torch.no_grad():
        assert not packing_is_exact(_ignores_position_ids(model), torch.device("cpu"))


def _ignores_position_ids(model):
    """The same Llama, but its decoder drops position_ids: the mask of one sequence spans the whole row."""
    import copy

    broken = copy.deepcopy(model)
    forward = broken.model.forward
    broken.model.forward = lambda *args, position_ids=None, **kwargs: forward(*args, **kwargs)
    return broken


def test_layout_arguments_are_checked(model):
    batch = packed_batch()
    with pytest.raises(ValueError, match="either attention_mask"):
        completion_logprobs(model, **batch, attention_mask=torch.ones_like(batch["input_ids"]))
    with pytest.raises(ValueError, match="either attention_mask"):
        completion_logprobs(
            model, batch["input_ids"], completion_mask=batch["completion_mask"], position_ids=batch["position_ids"]
        )


def test_packed_equals_padded_on_real_pairs_with_the_embedded_tiny_llama():
    from hdpo_ray.models import build_tiny_llama

    pairs, pad_id = real_pairs("hdpo-ray/tiny-llama", 8, max_length=256)
    assert_packed_equals_padded_on_real_pairs(build_tiny_llama().eval(), pairs, pad_id)
