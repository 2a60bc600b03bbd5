"""`torchrun --nproc_per_node=2 -m fastcache train --gather-across-devices`: DDP through sentence-transformers'
trainer with 2 CPU processes on the gloo backend, tiny offline model and data. The main process evaluates and saves;
the summary records the world size, and the model reloads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fastcache.app.train import SUMMARY_FILE

pytest.importorskip("sentence_transformers")
datasets = pytest.importorskip("datasets")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

WORDS = ["the", "a", "query", "document", "cat", "dog", "sun", "car", "work", "weather", "nice", "today"]


def test_torchrun_two_processes_gather_across_devices(tmp_path):
    from conftest import build_tiny_bert
    from sentence_transformers import SentenceTransformer

    build_tiny_bert(tmp_path / "model", seed=0)
    rows = [{"q": f"{WORDS[i % 12]} {WORDS[i // 12]} {i}", "p": f"{WORDS[i // 12]} the {WORDS[i % 12]} {i}"}
            for i in range(40)]
    datasets.Dataset.from_list(rows).to_json(str(tmp_path / "pairs.jsonl"))
    out = tmp_path / "trained"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastcache",
         "train", "--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "pairs.jsonl"),
         "--query-column", "q", "--positive-column", "p", "--eval-size", "8", "--batch-size", "4",
         "--max-steps", "2", "--max-seq-length", "24", "--compare-batch-size", "8", "--gather-across-devices",
         "--learning-rate", "1e-3", "--output-dir", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["settings"]["world_size"] == 2
    assert summary["settings"]["gather_across_devices"] is True
    assert summary["training"]["steps"] == 2
    assert done.stdout.count("model and fastcache_run.json saved") == 1  # only the main process reports
    trained = SentenceTransformer(str(out), device="cpu").encode(["the cat"], convert_to_tensor=True)
    start = SentenceTransformer(str(tmp_path / "model"), device="cpu").encode(["the cat"], convert_to_tensor=True)
    assert not torch.allclose(trained, start, atol=1e-4)
