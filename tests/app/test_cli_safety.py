"""The `fastcache` command with other people's files and bad settings around it: --output-dir never replaces what
it did not write (a folder made during the run, the working directory, a folder that is not a fastcache model),
SIGTERM cleans up, and every FASTCACHE_* variable and unreadable data file is one line and exit 2 before any work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastcache.app import output_dir
from fastcache.app.cli import main
from fastcache.app.train import SUMMARY_FILE, TrainError, save_run
from test_cli import _error, _train_args, pairs_file, tiny_model_dir  # noqa: F401 - the fixtures are used

pytest.importorskip("sentence_transformers")


class FakeModel:
    """Saves like a SentenceTransformer (a few files); ``during_save`` runs inside the save."""

    def __init__(self, during_save=None):
        self.during_save = during_save

    def save(self, path):
        (Path(path) / "config.json").write_text("{}")
        (Path(path) / "model.safetensors").write_bytes(b"weights")
        if self.during_save:
            self.during_save()


def _model_folder(path: Path, *extra: str) -> Path:
    """A model folder as fastcache writes it, plus ``extra`` files it did not write."""
    path.mkdir()
    FakeModel().save(path)
    (path / SUMMARY_FILE).write_text(json.dumps({"files": ["config.json", "model.safetensors"]}))
    for name in extra:
        (path / name).write_text("someone's notes")
    return path


def _no_renameat2(monkeypatch):
    monkeypatch.setattr(output_dir, "_renameat2", lambda: None)


# ------------------------------------------------------------------------------------- --output-dir made meanwhile


def test_output_dir_created_during_the_run_is_not_replaced(tiny_model_dir, pairs_file, tmp_path, capsys, monkeypatch):
    """Issue 17.6: the check at start passed, then someone made the folder; the run refuses and keeps its model."""
    import fastcache.app.train as train

    out = tmp_path / "model"
    compare = train.compare_loss_stage

    def someone_creates_it(*args, **kwargs):
        out.mkdir()
        (out / "theirs.txt").write_text("not yours")
        return compare(*args, **kwargs)

    monkeypatch.setattr(train, "compare_loss_stage", someone_creates_it)
    message = _error(capsys, _train_args(tiny_model_dir, pairs_file, out, "--max-steps", "1"))
    assert "was created by something else during the run" in message
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    kept = Path(message.split("kept in ")[1].strip("'"))
    assert kept.parent == tmp_path and (kept / SUMMARY_FILE).is_file() and (kept / "config.json").is_file()


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "lock_and_check"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_publish_never_replaces_a_folder_made_during_the_save(tmp_path, monkeypatch, renameat2, overwrite):
    """Even an empty folder (which a plain rename would silently replace), with renameat2 or its fallback."""
    if not renameat2:
        _no_renameat2(monkeypatch)
    out = tmp_path / "model"
    with pytest.raises(TrainError, match="kept in") as caught:
        save_run(FakeModel(during_save=out.mkdir), {}, out, overwrite)
    assert list(out.iterdir()) == []
    assert ("created by something else" if not overwrite else "no readable fastcache_run.json") in str(caught.value)


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "lock_and_check"])
def test_publish_new_and_overwrite_with_normal_permissions(tmp_path, monkeypatch, renameat2):
    if not renameat2:
        _no_renameat2(monkeypatch)
    umask = os.umask(0o022)
    try:
        out = tmp_path / "new" / "model"
        save_run(FakeModel(), {"run": 1}, out, False)
        assert out.stat().st_mode & 0o777 == 0o755
        assert json.loads((out / SUMMARY_FILE).read_text()) == {"run": 1, "files": ["config.json", "model.safetensors"]}
        save_run(FakeModel(), {"run": 2}, out, True)  # our own model folder: replaced
        assert json.loads((out / SUMMARY_FILE).read_text())["run"] == 2
        assert sorted(p.name for p in out.parent.iterdir()) == ["model"]  # no staging or old folder left
    finally:
        os.umask(umask)


# ------------------------------------------------------------------------------------- --overwrite of foreign folders


def test_overwrite_refuses_the_working_directory(tiny_model_dir, pairs_file, tmp_path, capsys, monkeypatch):
    """Issue 17.7: `--overwrite --output-dir .` deleted the working directory (data, notes, src/)."""
    work = tmp_path / "work"
    (work / "src").mkdir(parents=True)
    (work / "notes.txt").write_text("my notes")
    (work / "src" / "a.py").write_text("x = 1")
    monkeypatch.chdir(work)
    message = _error(capsys, _train_args(tiny_model_dir, pairs_file, ".", "--overwrite", "--max-steps", "1"))
    assert "is the working directory or holds it" in message
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt", "src"]
    # even a folder that looks like a model folder, when it holds the working directory
    _model_folder(tmp_path / "m")
    (tmp_path / "m" / "1_Pooling").mkdir()
    monkeypatch.chdir(tmp_path / "m" / "1_Pooling")
    assert "holds it" in _error(capsys, _train_args(tiny_model_dir, pairs_file, tmp_path / "m", "--overwrite"))


@pytest.mark.parametrize("case", ["notes", "no_run_file", "unlisted_file", "a_file", "bad_run_file"])
def test_overwrite_refuses_folders_fastcache_did_not_write(tiny_model_dir, pairs_file, tmp_path, capsys, case):
    out = tmp_path / "out"
    if case == "notes":
        out.mkdir()
        (out / "notes.txt").write_text("x")
    elif case == "no_run_file":
        out.mkdir()
        FakeModel().save(out)
    elif case == "unlisted_file":
        _model_folder(out, "dataset.jsonl")
    elif case == "a_file":
        out.write_text("a file")
    else:
        _model_folder(out)
        (out / SUMMARY_FILE).write_text("[1, 2]")
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    message = _error(capsys, _train_args(tiny_model_dir, pairs_file, out, "--overwrite"))
    assert message.startswith(f"fastcache train: error: --output-dir {str(out)!r}")
    assert "--overwrite" in message
    assert (sorted(p.name for p in out.iterdir()) if out.is_dir() else None) == before


def test_refusal_accepts_fastcache_model_folders(tmp_path):
    assert output_dir.refusal(_model_folder(tmp_path / "m"), overwrite=True) is None
    legacy = _model_folder(tmp_path / "legacy")  # a run file from before the list: every entry a model file
    (legacy / SUMMARY_FILE).write_text(json.dumps({"settings": {}}))
    (legacy / "1_Pooling").mkdir()
    assert output_dir.refusal(legacy, overwrite=True) is None
    (legacy / "notes.md").write_text("x")
    assert "'notes.md'" in output_dir.refusal(legacy, overwrite=True)
    assert "exists; pass --overwrite" in output_dir.refusal(tmp_path / "m", overwrite=False)


# ------------------------------------------------------------------------------------- SIGTERM


def test_sigterm_removes_the_trainer_folder(tiny_model_dir, pairs_file, tmp_path):
    """Issue 17.8: SIGTERM during training left an empty fastcache-trainer-* folder in the temp dir."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    argv = _train_args(tiny_model_dir, pairs_file, tmp_path / "out", "--max-steps", "100000")
    child = subprocess.Popen([sys.executable, "-m", "fastcache", *argv], env=env, cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list(scratch.glob("fastcache-trainer-*")):
            assert child.poll() is None and time.monotonic() < deadline, "training never started"
            time.sleep(0.05)
        time.sleep(0.5)
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 128 + signal.SIGTERM
    assert err.strip().splitlines()[-1] == "fastcache train: terminated (SIGTERM)"
    assert not list(scratch.glob("fastcache-trainer-*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]  # no model, no staging folder


# ------------------------------------------------------------------------------------- settings and data


BAD_SETTINGS = {
    "backend_bogus": ({"FASTCACHE_BACKEND": "bogus"}, "FASTCACHE_BACKEND must be one of"),
    "backend_cuda": ({"FASTCACHE_BACKEND": "cuda"}, "FASTCACHE_BACKEND='cuda' cannot run on the training device"),
    "backend_triton": ({"FASTCACHE_BACKEND": "triton"}, "FASTCACHE_BACKEND='triton' cannot run"),
    "strategy_bogus": ({"FASTCACHE_STRATEGY": "bogus"}, "FASTCACHE_STRATEGY must be one of"),
    "strategy_tiled_torch": ({"FASTCACHE_STRATEGY": "tiled", "FASTCACHE_BACKEND": "torch"},
                             "FASTCACHE_STRATEGY='tiled' runs Triton kernels"),
    "strategy_fused_slab_cpu": ({"FASTCACHE_STRATEGY": "fused_slab", "FASTCACHE_BACKEND": "cpu"},
                                "FASTCACHE_STRATEGY='fused_slab' runs Triton kernels"),
    "strategy_sparse_torch": ({"FASTCACHE_STRATEGY": "sparse", "FASTCACHE_BACKEND": "torch"},
                              "FASTCACHE_STRATEGY='sparse' runs the compiled CPU products: it needs FASTCACHE_BACKEND "
                              "auto or cpu"),
    "memory_abc": ({"FASTCACHE_MEMORY_BUDGET": "abc"}, "FASTCACHE_MEMORY_BUDGET must be a size"),
    "memory_zero": ({"FASTCACHE_MEMORY_BUDGET": "0"}, "FASTCACHE_MEMORY_BUDGET must be a size"),
    "memory_half_byte": ({"FASTCACHE_MEMORY_BUDGET": "0.5"}, "got '0.5' (0.5 bytes: not a whole number)"),
    "mini_batch_abc": ({"FASTCACHE_MINI_BATCH_BUDGET": "abc"}, "FASTCACHE_MINI_BATCH_BUDGET must be a size"),
    "mini_batch_zero": ({"FASTCACHE_MINI_BATCH_BUDGET": "0"}, "FASTCACHE_MINI_BATCH_BUDGET must be a size"),
    "mini_batch_negative": ({"FASTCACHE_MINI_BATCH_BUDGET": "-1MiB"}, "got '-1MiB'"),
}


@pytest.mark.parametrize("command", ["train", "train-reranker"])
@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_bad_settings_fail_before_any_work(tiny_model_dir, pairs_file, tmp_path, capsys, monkeypatch, case, command):
    """Issue 17.9: a bad FASTCACHE_* variable is one line naming it and exit 2, before the data is even read."""
    import torch

    import fastcache.app.train as train
    import fastcache.app.train_reranker as train_reranker

    if torch.cuda.is_available() and case == "backend_cuda":
        pytest.skip("FASTCACHE_BACKEND=cuda runs here")
    variables, expected = BAD_SETTINGS[case]
    if command == "train-reranker" and case.startswith("strategy_") and case != "strategy_bogus":
        pytest.skip("the ranking ops have one strategy")
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # conftest sets it: Triton could run on CPU tensors

    def no_work(*args, **kwargs):
        raise AssertionError("the data was loaded before the settings were checked")

    monkeypatch.setattr(train, "load_pairs", no_work)
    monkeypatch.setattr(train_reranker, "load_pairs", no_work)
    argv = _train_args(tiny_model_dir, pairs_file, tmp_path / "out")
    if command == "train-reranker":
        argv = [command, *[a for a in argv[1:] if a not in ("--compare-batch-size", "16")]]
    message = _error(capsys, argv)
    if command == "train-reranker" and case == "backend_triton":
        expected = "FASTCACHE_BACKEND='triton': the LambdaLoss op has no such backend"
    assert expected in message


def test_info_reports_bad_settings(capsys, monkeypatch):
    """Issue 17.9: `fastcache info` crashed on a bad budget and ignored FASTCACHE_STRATEGY=bogus."""
    monkeypatch.setenv("FASTCACHE_STRATEGY", "bogus")
    monkeypatch.setenv("FASTCACHE_MEMORY_BUDGET", "abc")
    assert main(["info"]) == 2
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert set(report["settings_errors"]) == {"FASTCACHE_STRATEGY", "FASTCACHE_MEMORY_BUDGET"}
    assert report["memory_budget_bytes"].startswith("error: FASTCACHE_MEMORY_BUDGET must be a size")
    lines = captured.err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("fastcache info: error: FASTCACHE_") for line in lines)
    assert os.environ["FASTCACHE_MEMORY_BUDGET"] == "abc"  # put back after info() ran without it


@pytest.mark.parametrize("content,expected", [
    (b"", "the file is empty"),
    (b"\n \n", "only whitespace, no rows"),
    ('{"q": "caf\u00e9", "p": "x"}\n'.encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 10, line 1)"),
    (b'{"q": "a", "p": "b"}\n{"q": "\xff", "p": "c"}\n', "not UTF-8 text (byte 0xff at offset 28, line 2)"),
])
def test_unreadable_jsonl_is_one_line(tiny_model_dir, tmp_path, capsys, content, expected):
    data = tmp_path / "data.jsonl"
    data.write_bytes(content)
    message = _error(capsys, _train_args(tiny_model_dir, data, tmp_path / "out"))
    assert message.startswith(f"fastcache train: error: --dataset {str(data)!r}: ")
    assert expected in message
    assert "StopIteration" not in message
