"""llmdrop.files: atomic folders, stale temporary folders, outputs that would overwrite inputs, JSON without NaN."""

import json
import os
import subprocess
import sys

import pytest
from tiny_models import tiny_model, tiny_tokenizer
from typer.testing import CliRunner

from llmdrop.cli import app
from llmdrop.errors import LlmdropError
from llmdrop.files import _host, atomic_dir, check_output_dir, remove_stale_siblings, write_json


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_atomic_dir_keeps_the_old_folder_when_the_write_fails_midway(tmp_path):
    out = tmp_path / "maps"
    out.mkdir()
    (out / "old.png").write_bytes(b"the user's maps")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "new.png").write_bytes(b"half")
            raise RuntimeError("disk full")
    assert snapshot(out) == {"old.png": b"the user's maps"}
    assert [p.name for p in tmp_path.iterdir()] == ["maps"]


def test_atomic_dir_replaces_on_success_with_readable_files(tmp_path):
    out = tmp_path / "maps"
    out.mkdir()
    (out / "old.png").write_bytes(b"old")
    with atomic_dir(out, overwrite=True) as tmp:
        fd = os.open(tmp / "weights.bin", os.O_CREAT | os.O_WRONLY, 0o600)  # as mkstemp-based writers leave it
        os.write(fd, b"new")
        os.close(fd)
    assert snapshot(out) == {"weights.bin": b"new"}
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "weights.bin").stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["maps"]


def test_stale_temporary_folders_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".out.llmdrop-tmp-{_host()}-{dead_pid}"
    live = tmp_path / f".other.llmdrop-tmp-{_host()}-{os.getppid()}"  # a running process: someone is writing
    foreign = tmp_path / f".out.llmdrop-tmp-otherhost-{dead_pid}"  # another machine's (shared disk): not ours to judge
    for folder in (stale, live, foreign):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 100)
    assert remove_stale_siblings(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, foreign.name])


@pytest.mark.parametrize("out_rel", [".", "proj", "proj/model", "proj/model/sub"])
def test_output_that_would_overwrite_the_input_is_refused(tmp_path, monkeypatch, out_rel):
    source = tmp_path / "proj" / "model"
    source.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LlmdropError, match="would overwrite the input"):
        check_output_dir(out_rel, overwrite=True, inputs=["proj/model"])
    check_output_dir("proj/other", overwrite=True, inputs=["proj/model"])  # a sibling is fine


def test_drop_overwrite_onto_the_source_parent_is_refused_and_nothing_is_lost(tmp_path):
    proj = tmp_path / "proj"
    tiny_model("llama", 4).save_pretrained(proj / "model")
    tiny_tokenizer().save_pretrained(proj / "model")
    (proj / "notes.txt").write_text("mine")
    before = snapshot(proj)
    r = CliRunner().invoke(app, ["drop", str(proj / "model"), "-o", str(proj), "--overwrite", "--attn-layers", "1"])
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [
        f"error: the output {proj} would overwrite the input {proj / 'model'}; choose another output directory"
    ]
    assert snapshot(proj) == before


def test_write_json_refuses_nan_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "eval_results.json"
    write_json([{"perplexity": 22.5}], path)
    with pytest.raises(LlmdropError, match="refusing to write .*eval_results.json"):
        write_json([{"perplexity": float("nan")}], path)
    assert json.loads(path.read_text()) == [{"perplexity": 22.5}]
