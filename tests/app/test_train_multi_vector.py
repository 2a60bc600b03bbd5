"""`fastcache train --model-type multi-vector`: a MultiVectorEncoder trained end to end on a tiny offline BERT (with
sentence-transformers' default token-level head) and a tiny local dataset, its MaxSim retrieval metrics before and
after, the saved model; its options' errors (one message, exit 2)."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import _error, _rows, _train_args, _write

from fastcache.app.cli import main
from fastcache.app.output_dir import SUMMARY_FILE
from fastcache.app.train_multi_vector import MultiVectorConfig, load_multi_vector

MV = ("--model-type", "multi-vector")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from conftest import build_tiny_bert

    folder = tmp_path_factory.mktemp("mv_cli_bert")
    build_tiny_bert(folder, seed=0)
    return folder


@pytest.fixture(scope="module")
def triples_file(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("mv_cli_data") / "triples.jsonl", _rows(40, negatives=True))


def _encode(model, texts):
    return [torch.as_tensor(t) for t in model.encode(texts, show_progress_bar=False)]


def test_train_multi_vector_end_to_end(bert_dir, triples_file, tmp_path, capsys):
    from sentence_transformers import MultiVectorEncoder

    out = tmp_path / "model"
    code = main(_train_args(bert_dir, triples_file, out, *MV, "--negative-column", "n", "--mini-batch-size", "3",
                            "--learning-rate", "1e-3"))
    assert code == 0
    printed = capsys.readouterr().out
    assert "ndcg@10" in printed and "CachedMultiVectorMultipleNegativesRankingLoss (fused MaxSim)" in printed
    summary = json.loads((out / SUMMARY_FILE).read_text())
    for key in ("metrics_before", "metrics_after"):
        assert set(summary[key]) == {"ndcg@10", "mrr@10", "recall@10"}
        assert all(0.0 <= v <= 1.0 for v in summary[key].values())
    assert summary["model_type"] == "multi-vector"
    assert summary["data"]["train_rows"] == 32 and summary["data"]["eval_queries"] == 8
    assert summary["training"]["steps"] == 2 and summary["training"]["final_loss"] > 0
    assert summary["settings"]["loss_class"] == "CachedMultiVectorMultipleNegativesRankingLoss"
    assert summary["settings"]["fused"] is True and summary["settings"]["mini_batch_size"] == 3
    # the saved model reloads as a MultiVectorEncoder, and it is the trained one, not the starting one (same seed)
    texts = ["the cat", "a dog today"]
    trained = _encode(MultiVectorEncoder(str(out), device="cpu"), texts)
    start = _encode(load_multi_vector(MultiVectorConfig(model=str(bert_dir))), texts)
    assert [t.shape for t in trained] == [t.shape for t in start]
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(trained, start))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_train_multi_vector_in_batch_loss(bert_dir, triples_file, tmp_path, capsys):
    out = tmp_path / "mnrl"
    assert main(_train_args(bert_dir, triples_file, out, *MV, "--loss", "mnrl", "--max-steps", "1")) == 0
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["settings"]["loss_class"] == "MultiVectorMultipleNegativesRankingLoss"
    assert summary["training"]["steps"] == 1


def test_new_head_is_seeded(bert_dir):
    heads = [dict(load_multi_vector(MultiVectorConfig(model=str(bert_dir), seed=seed)).named_parameters())
             for seed in (0, 0, 1)]
    projection = next(name for name in heads[0] if name.startswith("1."))  # the Dense after the Transformer
    assert torch.equal(heads[0][projection], heads[1][projection])
    assert not torch.equal(heads[0][projection], heads[2][projection])


def test_multi_vector_errors(bert_dir, triples_file, tmp_path, capsys):
    args = _train_args(bert_dir, triples_file, tmp_path / "never", *MV)
    assert "--model-type multi-vector: --loss 'gist' is not one of mnrl, cached-mnrl" in _error(
        capsys, args + ["--loss", "gist"])
    assert "--guide-model: --model-type dense only" in _error(capsys, args + ["--guide-model", "x"])
    assert "--matryoshka-dims: --model-type dense only" in _error(capsys, args + ["--matryoshka-dims", "16"])
    assert "--mini-batch-size applies to the cached losses only" in _error(
        capsys, args + ["--loss", "mnrl", "--mini-batch-size", "4"])
    assert "--batch-size must be at least 2" in _error(capsys, args + ["--batch-size", "1"])
    msg = _error(capsys, args + ["--model", str(tmp_path / "no-such-model")])
    assert "--model" in msg and "could not load a MultiVectorEncoder" in msg
    assert "invalid choice: 'colbert'" in _error(capsys, args[:-1] + ["colbert"])
    assert not (tmp_path / "never").exists()
