"""The model card of a model trained with a fastcache loss names sentence-transformers' class with its sbert.net
link and says that fastcache computed it (fastcache.model_card); upstream losses' lines are unchanged."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import build_tiny_bert
from datasets import Dataset
from sentence_transformers.base.model_card import generate_model_card
from sentence_transformers.cross_encoder import CrossEncoderTrainer, CrossEncoderTrainingArguments
from sentence_transformers.cross_encoder import losses as st_ce_losses
from sentence_transformers.sentence_transformer import losses as st_losses
from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer
from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments

import fastcache
from fastcache import losses
from fastcache.cross_encoder import losses as ce_losses

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from ranking_table import build_tiny_cross_encoder  # noqa: E402

BI = "https://sbert.net/docs/package_reference/sentence_transformer/losses.html#"
CE = "https://sbert.net/docs/package_reference/cross_encoder/losses.html#"


def _card(trainer_cls, args_cls, model, dataset, loss, folder) -> str:
    """The card of ``model`` after one training step with ``loss`` on ``dataset``."""
    args = args_cls(output_dir=str(folder), max_steps=1, per_device_train_batch_size=len(dataset), report_to=[],
                    save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer_cls(model=model, args=args, train_dataset=dataset, loss=loss).train()
    return generate_model_card(model)


def _loss_line(card: str) -> str:
    return next(line for line in card.splitlines() if line.startswith("* Loss:"))


def _note(card: str) -> str | None:
    return next((line for line in card.splitlines() if line.startswith("* Computed by:")), None)


@pytest.fixture()
def tiny_model(tmp_path):
    """A fresh tiny model per test (training changes it; the session's tiny_model stays untouched)."""
    return build_tiny_bert(tmp_path / "model", seed=0)


@pytest.fixture()
def tiny_guide_model(tmp_path):
    return build_tiny_bert(tmp_path / "guide", seed=1)


@pytest.fixture()
def bi_dataset():
    return Dataset.from_dict({"anchor": ["the cat", "a dog", "sun car"], "positive": ["cat", "dog", "car"]})


@pytest.mark.parametrize("name", ["MultipleNegativesRankingLoss", "CachedGISTEmbedLoss"])
def test_bi_encoder_card_names_upstream_class_with_link(tiny_model, tiny_guide_model, bi_dataset, tmp_path, name):
    extra = {"guide": tiny_guide_model, "mini_batch_size": 2} if "GIST" in name else {}
    loss = getattr(losses, name)(tiny_model, **extra)
    card = _card(SentenceTransformerTrainer, SentenceTransformerTrainingArguments, tiny_model, bi_dataset, loss,
                 tmp_path / "out")
    module = type(loss).__module__
    assert _loss_line(card) == f"* Loss: [<code>{name}</code>]({BI}{name.lower()}) with these parameters:"
    assert _note(card) == f"* Computed by: fastcache {fastcache.__version__} (<code>{module}.{name}</code>)"
    assert f"- loss:{name}\n" in card  # the tag: upstream's name


def test_matryoshka_around_fastcache_loss_notes_the_inner_class(tiny_model, bi_dataset, tmp_path):
    inner = losses.MultipleNegativesRankingLoss(tiny_model)
    loss = st_losses.MatryoshkaLoss(tiny_model, inner, [32, 16])  # upstream's wrapper
    card = _card(SentenceTransformerTrainer, SentenceTransformerTrainingArguments, tiny_model, bi_dataset, loss,
                 tmp_path / "out")
    assert _loss_line(card).startswith(f"* Loss: [<code>MatryoshkaLoss</code>]({BI}matryoshkaloss)")
    assert "fastcache.losses.multiple_negatives_ranking.MultipleNegativesRankingLoss" in _note(card)


def test_upstream_loss_card_unchanged(tiny_model, bi_dataset, tmp_path):
    loss = st_losses.MultipleNegativesRankingLoss(tiny_model)
    card = _card(SentenceTransformerTrainer, SentenceTransformerTrainingArguments, tiny_model, bi_dataset, loss,
                 tmp_path / "out")
    assert _loss_line(card).startswith(f"* Loss: [<code>MultipleNegativesRankingLoss</code>]({BI}")
    assert _note(card) is None


@pytest.mark.parametrize("name", ["LambdaLoss", "ListNetLoss"])
def test_cross_encoder_card_names_upstream_class_with_link(tmp_path, name):
    model = build_tiny_cross_encoder(tmp_path / "ce", seed=0)
    dataset = Dataset.from_dict({"query": ["abc def", "ghi jkl"], "docs": [["abc", "xyz", "def"], ["ghi", "uvw"]],
                                 "labels": [[2.0, 0.0, 1.0], [1.0, 0.0]]})
    loss = getattr(ce_losses, name)(model)
    card = _card(CrossEncoderTrainer, CrossEncoderTrainingArguments, model, dataset, loss, tmp_path / "out")
    assert _loss_line(card) == f"* Loss: [<code>{name}</code>]({CE}{name.lower()}) with these parameters:"
    assert _note(card) == (f"* Computed by: fastcache {fastcache.__version__} "
                           f"(<code>{type(loss).__module__}.{name}</code>)")
    assert isinstance(loss, getattr(st_ce_losses, name))


def test_patched_loss_card(tiny_model, bi_dataset, tmp_path):
    """A loss built from sentence-transformers' module after patch_sentence_transformers() gets the same card."""
    try:
        fastcache.patch_sentence_transformers()
        loss = st_losses.MultipleNegativesRankingLoss(tiny_model)
    finally:
        fastcache.unpatch_sentence_transformers()
    assert type(loss) is losses.MultipleNegativesRankingLoss
    card = _card(SentenceTransformerTrainer, SentenceTransformerTrainingArguments, tiny_model, bi_dataset, loss,
                 tmp_path / "out")
    assert _loss_line(card).startswith(f"* Loss: [<code>MultipleNegativesRankingLoss</code>]({BI}")
    assert "fastcache.losses.multiple_negatives_ranking.MultipleNegativesRankingLoss" in _note(card)
