"""The `fastcache` command: `train` end to end on a tiny offline model and tiny local datasets, `bench` on tiny
shapes, `info`, the data loading and held-out split, and every bad-input path (one message, non-zero exit, and no
half-written model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fastcache import losses
from fastcache.app.cli import main
from fastcache.app.data import BUILTIN, Columns, DataError, docstring_pairs, load_pairs, split_for_retrieval
from fastcache.app.train import LOSSES, SUMMARY_FILE, TrainConfig, build_loss

pytest.importorskip("sentence_transformers")
datasets = pytest.importorskip("datasets")

WORDS = ["the", "a", "query", "document", "cat", "dog", "sun", "car", "work", "weather", "nice", "today"]


def _rows(n: int, negatives: bool = False) -> list[dict]:
    """``n`` distinct (q, p[, n]) rows in the tiny model's vocabulary."""
    rows = []
    for i in range(n):
        a, b, c = WORDS[i % 12], WORDS[(i // 12) % 12], WORDS[(i * 5 + 3) % 12]
        row = {"q": f"{a} {b} {i}", "p": f"{a} {b} {c} the {b} {a} {i}"}
        if negatives:
            row["n"] = f"{c} {b} a {a} {(i + 7) % n}"
        rows.append(row)
    return rows


def _write(path, rows: list[dict]):
    """``rows`` as a .jsonl, .csv or .parquet file (by the path's suffix)."""
    table = datasets.Dataset.from_list(rows)
    {".jsonl": table.to_json, ".csv": table.to_csv, ".parquet": table.to_parquet}[path.suffix](str(path))
    return path


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from conftest import build_tiny_bert

    folder = tmp_path_factory.mktemp("cli_model")
    build_tiny_bert(folder, seed=0)
    return folder


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("cli_data") / "pairs.jsonl", _rows(40, negatives=True))


@pytest.fixture(scope="module")
def tiny_cross_encoder_dir(tiny_model_dir, tmp_path_factory):
    """A random 2-layer BertForSequenceClassification (one logit) with the tiny model's tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder = tmp_path_factory.mktemp("cli_cross_encoder")
    vocab = (tiny_model_dir / "vocab.txt").read_text()
    (folder / "vocab.txt").write_text(vocab)
    config = BertConfig(vocab_size=len(vocab.split()), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=1)
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(str(folder))
    torch.random.set_rng_state(state)
    BertTokenizerFast(vocab=str(folder / "vocab.txt")).save_pretrained(str(folder))
    return folder


def _train_args(model_dir, data, out, *extra: str) -> list[str]:
    return ["train", "--model", str(model_dir), "--dataset", str(data), "--query-column", "q",
            "--positive-column", "p", "--eval-size", "8", "--batch-size", "8", "--max-steps", "2",
            "--max-seq-length", "24", "--compare-batch-size", "16", "--output-dir", str(out), "--no-progress",
            *extra]


def _error(capsys, argv) -> str:
    """Run ``fastcache argv``, expect the bad-input exit (2) and return its one-line message."""
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


# ------------------------------------------------------------------------------------------------------- info


def test_info(capsys):
    assert main(["info"]) == 0
    report = json.loads(capsys.readouterr().out)
    import fastcache

    assert report["fastcache"] == fastcache.__version__
    assert report["torch"] == torch.__version__
    assert set(report["contrastive_loss"]["cpu"]["available"]) >= {"torch", "cpu"}


# ------------------------------------------------------------------------------------------------------- data


def test_docstring_pairs_are_deterministic_and_real():
    queries, passages = docstring_pairs(10**6, methods=True)
    assert (queries, passages) == docstring_pairs(10**6, methods=True)
    assert len(queries) == len(passages) >= 2 * len(docstring_pairs(10**6)[0]) * 0.7
    assert len(set(queries)) == len(queries)
    assert all(len(q) >= 15 and 40 <= len(p) <= 400 for q, p in zip(queries, passages))
    assert docstring_pairs(7, methods=True) == (queries[:7], passages[:7])


def test_docstring_pairs_do_not_depend_on_other_imports():
    """transformers (imported here, not in the fresh process) patches methods into logging.Logger."""
    import transformers  # noqa: F401

    code = ("import json; from fastcache.app.data import docstring_pairs; "
            "print(json.dumps(docstring_pairs(10**6, methods=True)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == list(map(list, docstring_pairs(10**6, methods=True)))


def test_builtin_split_holds_queries_out():
    rows, source = load_pairs(BUILTIN)
    assert source["rows"] == len(rows) > 400
    split = split_for_retrieval(rows, eval_size=50, seed=3)
    assert len(split.queries) == 50 and len(split.train) == len(rows) - 50
    held_out = set(split.queries.values())
    assert not held_out & {row[0] for row in split.train}
    passage_of = dict(rows)
    for qid, text in split.queries.items():
        (doc,) = split.relevant[qid]
        assert split.corpus[doc] == passage_of[text]
    assert set(split.corpus.values()) == {row[1] for row in rows}
    assert split_for_retrieval(rows, eval_size=50, seed=3) == split


def test_split_keeps_all_rows_of_a_held_out_query_out():
    rows = [("q1", "p1"), ("q1", "p2"), ("q2", "p3"), ("q3", "p4"), ("q4", "p5")]
    for seed in range(6):
        split = split_for_retrieval(rows, eval_size=1, seed=seed)
        (text,) = split.queries.values()
        assert text not in {row[0] for row in split.train}
        expected = {row[1] for row in rows if row[0] == text}
        assert {split.corpus[d] for d in split.relevant[next(iter(split.queries))]} == expected


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_local_files_load_with_named_columns(tmp_path, suffix):
    written = _rows(10, negatives=True)
    path = _write(tmp_path / f"data{suffix}", written)
    rows, source = load_pairs(str(path), columns=Columns("q", "p", "n"), limit=6)
    assert rows == [(r["q"], r["p"], r["n"]) for r in written[:6]]
    assert source["rows"] == 6


def test_data_errors(tmp_path):
    path = _write(tmp_path / "d.jsonl", _rows(5))
    with pytest.raises(DataError, match=r"no column 'query' \(its columns: q, p\)"):
        load_pairs(str(path), columns=Columns("query", "p"))
    bad = _write(tmp_path / "bad.jsonl", _rows(3) + [{"q": "the cat", "p": ""}])
    with pytest.raises(DataError, match=r"row 3, column 'p' is ''; expected a non-empty string"):
        load_pairs(str(bad), columns=Columns("q", "p"))
    with pytest.raises(DataError, match="no such file"):
        load_pairs(str(tmp_path / "missing.csv"))
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DataError, match="unknown file type '.txt'"):
        load_pairs(str(tmp_path / "data.txt"))
    (tmp_path / "broken.jsonl").write_text('{"q": "a", "p": "b"}\n{"q": \n')
    with pytest.raises(DataError, match="could not read it as json"):
        load_pairs(str(tmp_path / "broken.jsonl"), columns=Columns("q", "p"))
    with pytest.raises(DataError, match="too few"):
        split_for_retrieval([("a", "b"), ("c", "d")], eval_size=1)


# ------------------------------------------------------------------------------------------------------- losses


@pytest.mark.parametrize("name", list(LOSSES))
def test_build_loss_every_loss(tiny_model_dir, tiny_model, name, tmp_path):
    from sentence_transformers.sentence_transformer import losses as st_losses

    # an output folder of its own: the default (./fastcache-model) exists once `make train` has run here
    config = TrainConfig(model=str(tiny_model_dir), loss=name, gather_across_devices=True,
                         mini_batch_size=4 if name.startswith("cached-") else None, output_dir=tmp_path / "model")
    config.check()
    loss = build_loss(tiny_model, config)
    assert type(loss) is getattr(losses, LOSSES[name])
    assert isinstance(loss, getattr(st_losses, LOSSES[name]))
    assert loss.gather_across_devices
    if name.startswith("cached-"):
        assert loss.mini_batch_size == 4
    if "gist" in name:
        assert not any(p.requires_grad for p in loss.guide.parameters())


# ------------------------------------------------------------------------------------------------------- train


def test_train_end_to_end(tiny_model_dir, pairs_file, tmp_path, capsys):
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "model"
    code = main(_train_args(tiny_model_dir, pairs_file, out, "--negative-column", "n", "--mini-batch-size", "3",
                            "--learning-rate", "1e-3"))
    assert code == 0
    printed = capsys.readouterr().out
    assert "ndcg@10" in printed and "loss stage (CachedMultipleNegativesRankingLoss" in printed
    summary = json.loads((out / SUMMARY_FILE).read_text())
    for key in ("metrics_before", "metrics_after"):
        assert set(summary[key]) == {"ndcg@10", "mrr@10", "recall@10"}
        assert all(0.0 <= v <= 1.0 for v in summary[key].values())
    assert summary["data"]["train_rows"] == 32 and summary["data"]["eval_queries"] == 8
    assert summary["training"]["steps"] == 2
    assert summary["settings"]["loss_class"] == "CachedMultipleNegativesRankingLoss"
    assert summary["settings"]["mini_batch_size"] == 3
    stage = summary["loss_stage"]
    assert stage["columns"] == 3 and stage["batch_size"] == 16
    assert stage["fastcache_s"] > 0 and stage["sentence_transformers_s"] > 0
    assert stage["fastcache_loss"] == pytest.approx(stage["sentence_transformers_loss"], rel=1e-5)
    assert summary["versions"]["fastcache"]
    # the saved model reloads, and it is the trained one, not the starting one
    texts = ["the cat", "a dog today"]
    trained = SentenceTransformer(str(out), device="cpu").encode(texts, convert_to_tensor=True)
    start = SentenceTransformer(str(tiny_model_dir), device="cpu").encode(texts, convert_to_tensor=True)
    assert trained.shape == start.shape and not torch.allclose(trained, start, atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left behind
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    assert summary["files"] == sorted(p.name for p in out.iterdir() if p.name != SUMMARY_FILE)


def test_train_gist_with_auto_mini_batches(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "gist"
    assert main(_train_args(tiny_model_dir, pairs_file, out, "--loss", "cached-gist", "--mini-batch-size",
                            "auto", "--max-steps", "1")) == 0
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["settings"]["loss_class"] == "CachedGISTEmbedLoss"
    assert summary["loss_stage"]["loss"] == "CachedMultipleNegativesRankingLoss"  # GIST compares its MNRL op


def test_interrupted_run_leaves_the_old_model(tiny_model_dir, pairs_file, tmp_path, capsys, monkeypatch):
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("the previous model")
    (out / SUMMARY_FILE).write_text(json.dumps({"files": ["old.txt"]}))  # a model folder fastcache wrote

    def interrupted_save(self, path, *args, **kwargs):
        (tmp_path / "saving-into").write_text(str(path))
        (tmp_path / path / "partial.bin").write_text("half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(SentenceTransformer, "save", interrupted_save)
    code = main(_train_args(tiny_model_dir, pairs_file, out, "--overwrite", "--max-steps", "1"))
    assert code == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [SUMMARY_FILE, "old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "saving-into"]  # the partial folder is gone


def test_errors(tiny_model_dir, pairs_file, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "never")
    args = _train_args(tiny_model_dir, pairs_file, out)
    assert "--mini-batch-size: must be a positive integer or 'auto', got 0" in _error(
        capsys, args + ["--mini-batch-size", "0"])
    assert "--mini-batch-size applies to the cached losses only" in _error(
        capsys, args + ["--loss", "mnrl", "--mini-batch-size", "4"])
    assert "--batch-size must be at least 2" in _error(capsys, args + ["--batch-size", "1"])
    assert "--max-steps must be a positive number" in _error(capsys, args + ["--max-steps", "0"])
    assert "--learning-rate must be positive" in _error(capsys, args + ["--learning-rate", "-1"])
    assert "--guide-model applies to the GIST losses only" in _error(capsys, args + ["--guide-model", "x"])
    msg = _error(capsys, args + ["--model", str(tmp_path / "no-such-model")])
    assert "--model" in msg and "could not load a SentenceTransformer" in msg
    msg = _error(capsys, args + ["--dataset", "no-such-org/no-such-dataset"])
    assert "--dataset 'no-such-org/no-such-dataset': not a local file" in msg and "Hugging Face" in msg
    assert "has no column 'query'" in _error(capsys, args + ["--query-column", "query"])
    bad = _write(tmp_path / "bad.csv", _rows(20) + [{"q": "the sun", "p": None}])
    assert "row 20, column 'p' is None" in _error(
        capsys, _train_args(tiny_model_dir, bad, out))
    existing = tmp_path / "exists"
    existing.mkdir()
    assert "exists; pass --overwrite" in _error(capsys, _train_args(tiny_model_dir, pairs_file, existing))

    monkeypatch.delattr(losses, "MatryoshkaLoss", raising=False)
    assert "needs fastcache.losses.MatryoshkaLoss" in _error(capsys, args + ["--matryoshka-dims", "16", "8"])
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss

    monkeypatch.setattr(losses, "MatryoshkaLoss", MatryoshkaLoss, raising=False)
    assert "--matryoshka-dims [64] exceed the model's embedding dimension 32" in _error(
        capsys, args + ["--matryoshka-dims", "64", "16"])
    assert not (tmp_path / "never").exists()


def test_error_exit_from_a_real_process(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fastcache", "train", "--dataset", str(tmp_path / "x.jsonl"),
                           "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"fastcache train: error: --dataset {str(tmp_path / 'x.jsonl')!r}: no such file")
    assert "Traceback" not in done.stderr


def test_matryoshka_when_available(tiny_model_dir, pairs_file, tmp_path):
    if not hasattr(losses, "MatryoshkaLoss"):
        pytest.skip("fastcache.losses.MatryoshkaLoss is not in this build yet (the error path is tested)")
    out = tmp_path / "matryoshka"
    assert main(_train_args(tiny_model_dir, pairs_file, out, "--matryoshka-dims", "32", "16", "8",
                            "--max-steps", "1")) == 0
    assert json.loads((out / SUMMARY_FILE).read_text())["settings"]["loss_class"] == "MatryoshkaLoss"


def test_train_reranker_new_head_is_seeded(tiny_model_dir):
    """A checkpoint without a one-logit head (as the default all-MiniLM-L6-v2) gets one initialised from --seed: the
    same seed gives the same head, so the metrics before training repeat; another seed gives another head."""
    pytest.importorskip("fastcache.cross_encoder.losses")
    from fastcache.app.train_reranker import RerankConfig, load_reranker

    heads = [dict(load_reranker(RerankConfig(model=str(tiny_model_dir), seed=seed)).named_parameters())
             ["0.model.classifier.weight"] for seed in (0, 0, 1)]
    assert torch.equal(heads[0], heads[1])
    assert not torch.equal(heads[0], heads[2])


def test_train_reranker_end_to_end(tiny_cross_encoder_dir, tiny_model_dir, pairs_file, tmp_path, capsys):
    ce_losses = pytest.importorskip("fastcache.cross_encoder.losses")
    from sentence_transformers.cross_encoder import CrossEncoder

    out = tmp_path / "reranker"
    argv = ["train-reranker", "--model", str(tiny_cross_encoder_dir), "--retriever", str(tiny_model_dir),
            "--dataset", str(pairs_file), "--query-column", "q", "--positive-column", "p", "--eval-size", "6",
            "--batch-size", "4", "--negatives", "3", "--max-steps", "2", "--max-seq-length", "32",
            "--learning-rate", "1e-3", "--output-dir", str(out), "--no-progress"]
    assert main(argv) == 0
    assert "ndcg@10" in capsys.readouterr().out
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["settings"]["loss_class"] == "LambdaLoss" == ce_losses.LambdaLoss.__name__
    assert summary["data"]["eval_queries"] == 6 and summary["data"]["train_lists"] == 34
    assert summary["training"]["steps"] == 2
    for key in ("metrics_before", "metrics_after"):
        assert set(summary[key]) == {"map", "mrr@10", "ndcg@10"}
        assert all(0.0 <= v <= 1.0 for v in summary[key].values())
    pairs = [("the cat", "the cat 1"), ("a dog", "sun car")]
    trained = CrossEncoder(str(out), device="cpu").predict(pairs)
    start = CrossEncoder(str(tiny_cross_encoder_dir), device="cpu").predict(pairs)
    assert trained.shape == (2,) and not torch.allclose(torch.as_tensor(trained), torch.as_tensor(start), atol=1e-5)
    assert "--negatives: must be a positive integer" in _error(capsys, argv[:-3] + ["--negatives", "0"])
    assert "exists; pass --overwrite" in _error(capsys, argv)


# ------------------------------------------------------------------------------------------------------- bench


def test_bench_tiny(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--batch-sizes", "8", "24", "--dim", "16", "--repeats", "1", "--no-memory",
                 "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| bare GEMMs" in printed and "| sentence-transformers CachedMNRL" in printed
    report = json.loads((out / "bench.json").read_text())
    assert report["batch_sizes"] == [8, 24]
    for B in ("8", "24"):
        rows = {name: by_batch[B] for name, by_batch in report["cases"].items()}
        assert all("error" not in row and row["min_s"] > 0 for row in rows.values()), rows
        losses_here = [row["loss"] for row in rows.values() if row["loss"] is not None]
        assert len(losses_here) == len(rows) - 1  # every case but the bare GEMMs computes the loss
        assert max(losses_here) - min(losses_here) <= 1e-5 * abs(losses_here[0])
    assert (out / "bench_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "bench_memory.png").exists()


def test_bench_without_matplotlib_asks_for_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    out = tmp_path / "bench"
    argv = ["bench", "--batch-sizes", "8", "--dim", "16", "--repeats", "1", "--no-memory", "--cases", "gemms",
            "reference", "--out-dir", str(out)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err == ("fastcache bench draws its plots with matplotlib: pip install 'fastcache[plots]' "
                            "(or pass --no-plots)\n")
    assert captured.out == "" and not out.exists()  # refused before the run

    assert main([*argv, "--no-plots"]) == 0
    assert "| dense reference" in capsys.readouterr().out
    assert sorted(path.name for path in out.iterdir()) == ["bench.json"]
    assert json.loads((out / "bench.json").read_text())["batch_sizes"] == [8]


def test_bench_memory(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--batch-sizes", "512", "--dim", "64", "--repeats", "1", "--cases", "gemms",
                 "reference", "--out-dir", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    peaks = {name: by_batch["512"]["peak_mib"] for name, by_batch in report["cases"].items()}
    # the dense reference holds the B x N similarity matrix (1 MiB here) and its softmax: more than the GEMMs
    assert peaks["reference"] >= 1.0 and peaks["gemms"] >= 0.5, peaks
    assert (out / "bench_memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
