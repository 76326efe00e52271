"""thinkrl never deletes or overwrites a file it did not write (``thinkrl.output_folder``): every command that
writes a folder refuses, in one line, a folder holding someone else's files, and ``--overwrite`` replaces only the
entries that command writes. Each test starts from a folder of "user files", some with the names thinkrl uses."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest import TINY
from eval_fixtures import TINY_BYTE, write_eval_data

from thinkrl import output_folder
from thinkrl.cli import main
from thinkrl.config import load_config
from thinkrl.errors import ConfigError
from thinkrl.run.state import find_checkpoints
from thinkrl.run.trainer import Trainer

USER_FILES = {  # a user's own folder: a thesis, notes, and files that share names with thinkrl's outputs
    "thesis.txt": "chapter 1\n",
    "metrics.jsonl": '{"my": "own metrics"}\n',
    "config.yaml": "not: [a thinkrl recipe\n",
    "results.json": "{}\n",
    "items.jsonl": "my items\n",
    "roles.json": '{"cast": "Hamlet"}\n',
    "rollouts/notes.txt": "draft\n",
    "A/keep.txt": "a folder named like a weight group\n",
}


def _user_folder(path: Path) -> Path:
    for name, text in USER_FILES.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return path


def _fingerprint(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in path.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    Trainer(load_config(None, [*TINY, "trainer.max_steps=1", f"trainer.output_dir={out}"])).train()
    return find_checkpoints(out)[-1]


def _refused(capsys, argv, folder):
    before = _fingerprint(folder)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"thinkrl: error: {folder} already holds files"), err
    assert "--overwrite" in err[0]
    assert _fingerprint(folder) == before, "a refused command changed the user's files"


def test_export_train_eval_sweep_and_coconut_refuse_a_folder_of_user_files(tmp_path, capsys, checkpoint):
    folder = _user_folder(tmp_path / "mine")
    _refused(capsys, ["export", str(checkpoint), str(folder)], folder)
    _refused(capsys, ["train", *TINY, "trainer.max_steps=1", f"trainer.output_dir={folder}"], folder)
    data = write_eval_data(tmp_path)
    eval_args = ["--config", "configs/default.yaml", "--task", "gsm8k", "--thoughts", "none", "--no-generate"]
    _refused(capsys, ["eval", *eval_args, "--output", str(folder), *TINY_BYTE, f"data.data_dir={data}"], folder)
    _refused(capsys, ["sweep", "--seeds", "0", "--out", str(folder), *TINY, "trainer.max_steps=1"], folder)
    _refused(capsys, ["coconut", "train", f"trainer.output_dir={folder}", "trainer.report_to=none"], folder)


def test_overwrite_replaces_only_what_the_command_writes(tmp_path, checkpoint):
    exported = _user_folder(tmp_path / "exported")
    assert main(["export", str(checkpoint), str(exported), "--overwrite"]) == 0
    kept = _fingerprint(exported)
    for name in ("thesis.txt", "metrics.jsonl", "config.yaml", "results.json", "items.jsonl", "rollouts/notes.txt"):
        assert kept[name] == hashlib.sha256(USER_FILES[name].encode()).hexdigest(), name
    assert "A/keep.txt" not in kept and (exported / "A" / "config.json").is_file()  # A/ is the export's now
    assert (exported / "head.safetensors").is_file() and output_folder.read_stamp(exported) == "export"
    # an export into its own earlier export replaces its entries, still keeping the user's
    assert main(["export", str(checkpoint), str(exported)]) == 0
    assert (exported / "thesis.txt").read_text() == USER_FILES["thesis.txt"]

    run = _user_folder(tmp_path / "run")
    Trainer(load_config(None, [*TINY, "trainer.max_steps=1", f"trainer.output_dir={run}"]), overwrite=True).train()
    assert (run / "thesis.txt").read_text() == USER_FILES["thesis.txt"]
    assert (run / "results.json").read_text() == USER_FILES["results.json"]  # not a name a run writes
    assert not (run / "rollouts" / "notes.txt").exists()  # rollouts/ is a run's: replaced, as --overwrite says
    assert find_checkpoints(run) and output_folder.read_stamp(run) == "train"
    # the same command again resumes the run it now holds
    Trainer(load_config(None, [*TINY, "trainer.max_steps=2", f"trainer.output_dir={run}"])).train()
    assert [c.name for c in find_checkpoints(run)][-1] == "checkpoint-2"


def test_a_run_folder_made_before_the_stamp_still_resumes_and_a_stale_start_keeps_other_files(tmp_path):
    run = tmp_path / "run"
    cfg = load_config(None, [*TINY, "trainer.max_steps=1", f"trainer.output_dir={run}"])
    Trainer(cfg).train()
    (run / output_folder.STAMP).unlink()  # as written by an earlier version
    assert output_folder.decide(run, "train", lambda f: (f / "config.yaml").is_file()).state == "ours"
    Trainer(load_config(None, [*TINY, "trainer.max_steps=2", f"trainer.output_dir={run}"])).train()
    assert [c.name for c in find_checkpoints(run)][-1] == "checkpoint-2"
    # a start that never wrote a checkpoint is cleared: only its own files, not a note left in rollouts/
    stale = tmp_path / "stale"
    Trainer(load_config(None, [*TINY, "trainer.max_steps=1", "trainer.save_every=0", f"trainer.output_dir={stale}"]))
    (stale / "metrics.jsonl").write_text('{"step": 0}\n')
    (stale / "rollouts" / "step-000001.jsonl").write_text("{}\n")
    (stale / "rollouts" / "mine.txt").write_text("keep\n")
    Trainer(load_config(None, [*TINY, "trainer.max_steps=1", f"trainer.output_dir={stale}"]))
    assert not (stale / "metrics.jsonl").exists() and not (stale / "rollouts" / "step-000001.jsonl").exists()
    assert (stale / "rollouts" / "mine.txt").read_text() == "keep\n"


def test_decide_by_hand(tmp_path):
    assert output_folder.decide(tmp_path / "absent", "eval").state == "new"
    (tmp_path / "empty").mkdir()
    assert output_folder.decide(tmp_path / "empty", "eval").state == "new"
    mine = _user_folder(tmp_path / "mine")
    with pytest.raises(ConfigError, match="already holds files"):
        output_folder.decide(mine, "eval")
    decision = output_folder.decide(mine, "eval", overwrite=True)
    assert sorted(p.name for p in decision.remove) == ["items.jsonl", "results.json"]
    output_folder.claim(decision)
    assert sorted(p.name for p in mine.iterdir()) == [
        ".thinkrl",
        "A",
        "config.yaml",
        "metrics.jsonl",
        "roles.json",
        "rollouts",
        "thesis.txt",
    ]
    assert output_folder.decide(mine, "eval").state == "ours"
    with pytest.raises(ConfigError, match="thinkrl eval folder"):  # another command's folder is refused too
        output_folder.decide(mine, "export")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        output_folder.decide(tmp_path / "file", "train")


@pytest.mark.parametrize("script", ["bench_memory", "bench_every_token"])
def test_benchmarks_refuse_to_overwrite_a_file_they_did_not_write(tmp_path, script, capsys, monkeypatch):
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{script}.py"
    spec = importlib.util.spec_from_file_location(f"_{script}", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclasses look their module up there
    spec.loader.exec_module(bench)  # the script's own argument parsing, in this process: it refuses before measuring
    mine = tmp_path / "mine.json"
    mine.write_text('{"my": "numbers"}\n')
    with pytest.raises(SystemExit) as info:
        bench.parse_args(["--quick", "--json", str(mine)])
    assert info.value.code == 2 and f"{mine} exists and was not written by {script}" in capsys.readouterr().err
    assert mine.read_text() == '{"my": "numbers"}\n'
    bench.parse_args(["--quick", "--json", str(tmp_path / "absent.json")])  # a new path is fine
    (tmp_path / "ours.json").write_text(f'{{"written_by": "{script}", "rows": []}}')
    bench.parse_args(["--quick", "--json", str(tmp_path / "ours.json")])  # so is its own earlier output


def test_dry_runs_report_the_folder_decision_and_build_nothing(tmp_path, capsys, checkpoint):
    run = checkpoint.parent
    assert main(["train", *TINY, "trainer.max_steps=3", f"trainer.output_dir={run}", "--dry-run"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("recipe: models A=scratch") and out[1] == (
        f"{run}: resumes from {checkpoint} and trains to step 3"
    )
    new = tmp_path / "new"
    assert main(["train", *TINY, f"trainer.output_dir={new}", "--dry-run"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"{new}: a new run, steps 1..100") and not new.exists()
    mine = _user_folder(tmp_path / "mine")
    before = _fingerprint(mine)
    assert main(["train", *TINY, f"trainer.output_dir={mine}", "--dry-run"]) == 2
    assert main(["export", str(checkpoint), str(mine), "--dry-run"]) == 2
    assert main(["eval", "--model", str(run), "--task", "gsm8k", "--output", str(mine), "--dry-run"]) == 2
    assert _fingerprint(mine) == before
    capsys.readouterr()
    assert main(["eval", "--model", str(run), "--task", "gsm8k", "--output", str(new), "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"model: run {run}, {checkpoint.name}",
        f"{new}: new or empty, eval writes into it",
    ]
    assert main(["export", str(checkpoint), str(new), "--dry-run", "--overwrite"]) == 0
    assert "weight groups A" in capsys.readouterr().out and not new.exists()
    assert main(["train", *TINY, "model.nonsense=1", "--dry-run"]) == 2  # an unknown key fails as it would for real
    assert "unknown config key" in capsys.readouterr().err
