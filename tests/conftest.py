"""Session fixtures shared by the test suite: tiny SentenceTransformer models built offline.

No Hugging Face Hub access anywhere: the models are random BERTs written to a temporary folder (the recipe of
/work/shared/NOTES.md) and loaded back with ``SentenceTransformer(path)`` (Transformer + mean pooling).
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / sentence-transformers are imported
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
from hypothesis import HealthCheck, settings

# The Triton kernels run on CPU tensors through Triton's interpreter, which has to be on before triton is first
# imported (it decides then). Without CUDA the whole session uses it, so every test over the backends that can
# run on CPU covers triton too, whatever the order in which modules are collected or run alone.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Hypothesis budgets (tests/contrastive/test_properties_contrastive.py): "ci", the default, runs a fixed derandomised set of
# examples per test (the same on every run: reproducible, bounded time); "thorough" runs 20 times as many, random.
# Choose with FASTCACHE_HYPOTHESIS_PROFILE=ci|thorough.
_HYPOTHESIS = dict(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow,
                                                                           HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=25, derandomize=True, **_HYPOTHESIS)
settings.register_profile("thorough", max_examples=500, **_HYPOTHESIS)
settings.load_profile(os.environ.get("FASTCACHE_HYPOTHESIS_PROFILE", "ci"))

_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]
_WORDS = ["the", "a", "query", "document", "cat", "dog", "sun", "car", "work", "weather", "nice", "today"]


def write_tiny_bert(folder, seed: int, hidden_size: int = 32, architecture: str = "BertModel") -> None:
    """Write a random 2-layer BERT (the transformers class ``architecture``, seeded by ``seed``) and its tokenizer
    into ``folder``."""
    import transformers
    from transformers import BertConfig, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = _SPECIAL_TOKENS + _LETTERS + [f"##{c}" for c in _LETTERS] + _WORDS
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(folder / "vocab.txt"))  # transformers 5: `vocab`, not `vocab_file`
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        getattr(transformers, architecture)(config).save_pretrained(str(folder))
    finally:
        torch.random.set_rng_state(state)
    tokenizer.save_pretrained(str(folder))


def build_tiny_bert(folder, seed: int, hidden_size: int = 32):
    """Write a random 2-layer BERT and its tokenizer into ``folder``; return ``SentenceTransformer(folder)``
    in eval mode (dropout off, so repeated encodings are identical)."""
    from sentence_transformers import SentenceTransformer

    write_tiny_bert(folder, seed, hidden_size)
    model = SentenceTransformer(str(folder), device="cpu")
    model.eval()
    return model


def build_tiny_multi_vector(folder, seed: int):
    """A random tiny BERT (:func:`build_tiny_bert`) in ``folder / "bert"`` loaded as a MultiVectorEncoder, as
    sentence-transformers builds one from a bare transformer: Transformer, a token-level Dense projection to 128
    dimensions (initialised from ``seed``), MultiVectorMask, token-level Normalize; in eval mode."""
    from sentence_transformers import MultiVectorEncoder

    build_tiny_bert(folder / "bert", seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MultiVectorEncoder(str(folder / "bert"), device="cpu")
    model.eval()
    return model


def build_tiny_splade(folder, seed: int, hidden_size: int = 32):
    """Write a random 2-layer BertForMaskedLM and its tokenizer into ``folder``; return ``SparseEncoder(folder)``
    (the MLM head and SPLADE max pooling: embeddings over the 69-token vocabulary, non-negative) in eval mode."""
    from sentence_transformers import SparseEncoder

    write_tiny_bert(folder, seed, hidden_size, architecture="BertForMaskedLM")
    model = SparseEncoder(str(folder), device="cpu")
    model.eval()
    return model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random SentenceTransformer (BERT, 32 dims, mean pooling), built offline, seed 0."""
    return build_tiny_bert(tmp_path_factory.mktemp("tiny_model"), seed=0)


@pytest.fixture(scope="session")
def tiny_guide_model(tmp_path_factory):
    """A second tiny SentenceTransformer with the same tokenizer and a different seed (a GIST guide)."""
    return build_tiny_bert(tmp_path_factory.mktemp("tiny_guide_model"), seed=1)


@pytest.fixture()
def model(tiny_model):
    """``tiny_model`` in eval mode, with no parameter gradients before or after the test (the drop-in argument,
    instance-override and negative-scale tests compare losses and gradients with upstream's on it)."""
    tiny_model.eval()
    tiny_model.zero_grad(set_to_none=True)
    yield tiny_model
    tiny_model.zero_grad(set_to_none=True)
