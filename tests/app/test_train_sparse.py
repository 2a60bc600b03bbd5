"""`fastcache train --model-type sparse`: a SPLADE SparseEncoder trained end to end on a tiny offline BertForMaskedLM
and a tiny local dataset, its retrieval metrics and active dimensions before and after, the saved model; its
options' errors (one message, exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_cli import _error, _rows, _train_args, _write

from fastcache.app.cli import main
from fastcache.app.output_dir import SUMMARY_FILE
from fastcache.app.train_sparse import SparseConfig, load_sparse_encoder

SPARSE = ("--model-type", "sparse")


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory):
    from conftest import write_tiny_bert

    folder = tmp_path_factory.mktemp("sparse_cli_mlm")
    write_tiny_bert(folder, seed=0, architecture="BertForMaskedLM")
    return folder


@pytest.fixture(scope="module")
def triples_file(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("sparse_cli_data") / "triples.jsonl", _rows(40, negatives=True))


def _encode(model, texts):
    return model.encode(texts, convert_to_tensor=True, show_progress_bar=False).to_dense()


@pytest.mark.parametrize("loss", ["cached-mnrl", "mnrl"])
def test_train_sparse_end_to_end(mlm_dir, triples_file, tmp_path, capsys, loss):
    from sentence_transformers import SparseEncoder

    out = tmp_path / "model"
    extra = ("--mini-batch-size", "3") if loss.startswith("cached") else ()
    code = main(_train_args(mlm_dir, triples_file, out, *SPARSE, "--loss", loss, "--negative-column", "n", *extra,
                            "--learning-rate", "1e-3", "--document-regularizer-weight", "0.01",
                            "--query-regularizer-weight", "0.02"))
    assert code == 0
    printed = capsys.readouterr().out
    wrapper = "CachedSpladeLoss" if loss.startswith("cached") else "SpladeLoss"
    assert "ndcg@10" in printed and f"{wrapper}(SparseMultipleNegativesRankingLoss), contrastive term fused" in printed
    summary = json.loads((out / SUMMARY_FILE).read_text())
    for key in ("metrics_before", "metrics_after"):
        metrics = summary[key]
        assert set(metrics) == {"ndcg@10", "mrr@10", "recall@10", "query_dims", "doc_dims"}
        assert all(0.0 <= metrics[k] <= 1.0 for k in ("ndcg@10", "mrr@10", "recall@10"))
        assert all(0 < metrics[k] <= 69 for k in ("query_dims", "doc_dims"))  # the tiny vocabulary
    assert summary["model_type"] == "sparse" and summary["settings"]["fused"] is True
    assert summary["data"]["train_rows"] == 32 and summary["data"]["eval_queries"] == 8
    assert summary["training"]["steps"] == 2 and summary["training"]["final_loss"] > 0
    assert summary["settings"]["loss_class"] == wrapper
    assert summary["settings"]["document_regularizer_weight"] == 0.01
    assert summary["settings"]["query_regularizer_weight"] == 0.02
    # the saved model reloads as a SparseEncoder, and it is the trained one, not the starting one
    texts = ["the cat", "a dog today"]
    trained = _encode(SparseEncoder(str(out), device="cpu"), texts)
    start = _encode(load_sparse_encoder(SparseConfig(model=str(mlm_dir))), texts)
    assert trained.shape == start.shape == (2, 69) and bool((trained >= 0).all())
    assert not torch.allclose(trained, start)


def test_default_model_is_minilm_with_a_new_mlm_head():
    """No --model: all-MiniLM-L6-v2's encoder with a new MLM head (seeded) and SPLADE pooling, offline."""
    first, second = (load_sparse_encoder(SparseConfig(seed=3)) for _ in range(2))
    assert [type(m).__name__ for m in first] == ["Transformer", "SpladePooling"]
    assert _encode(first, ["the cat"]).shape == (1, 30522)  # BERT's vocabulary
    head = [n for n, _ in first.named_parameters() if "predictions.transform" in n]
    assert head and all(torch.equal(dict(first.named_parameters())[n], dict(second.named_parameters())[n])
                        for n in head)


ERRORS = {
    "dense loss": ((*SPARSE, "--loss", "gist"), "--model-type sparse: --loss 'gist' is not one of mnrl, cached-mnrl"),
    "weight on dense": (("--document-regularizer-weight", "0.1"), "--document-regularizer-weight: --model-type "
                                                                   "sparse only"),
    "negative weight": ((*SPARSE, "--query-regularizer-weight", "-1"), "--query-regularizer-weight must be a finite "
                                                                       "number >= 0, got -1.0"),
    "guide": ((*SPARSE, "--guide-model", "x"), "--guide-model: --model-type dense only"),
    "mini-batch uncached": ((*SPARSE, "--loss", "mnrl", "--mini-batch-size", "4"),
                            "--mini-batch-size applies to the cached losses only, not --loss mnrl"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_sparse_option_errors(mlm_dir, triples_file, tmp_path, capsys, case):
    extra, message = ERRORS[case]
    out = tmp_path / "model"
    assert message in _error(capsys, _train_args(mlm_dir, triples_file, out, *extra))
    assert not out.exists()


def test_unloadable_model(triples_file, tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    message = _error(capsys, _train_args(missing, triples_file, tmp_path / "out", *SPARSE))
    assert message.startswith(f"fastcache train: error: --model '{missing}': could not load a SparseEncoder")
    assert not Path(tmp_path / "out").exists()
