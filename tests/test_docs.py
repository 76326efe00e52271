"""Every ``thinkrl …`` and ``accelerate launch … -m thinkrl …`` command in README.md and docs/ runs with ``--dry-run``
in the state the docs assume: after a real run of the quick start (its recipe, cut to 2 RL steps; a run folder is
resumable under a longer ``trainer.max_steps``). A command fails on an unknown key or flag, a refused folder or a
missing checkpoint; two different examples may not write into one folder. Commands with a ``<placeholder>`` (a GPU
recipe of the reader's) are checked only for their launch config file."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from thinkrl.cli import main

ROOT = Path(__file__).resolve().parents[1]
DECISION = re.compile(
    r"(?:^|-> )(\S+): (?:new or empty|written by|--overwrite|resumes from|a new run|a start that)", re.M
)


def documented_commands(files: list[Path], root: Path = ROOT) -> list[tuple[str, list[str]]]:
    """(where, argv after ``thinkrl``) of each command in the fenced code blocks of ``files``; launch config files
    are looked up in ``root``."""
    found = []
    for path in files:
        for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                for segment in line.split("&&"):  # bash scripts/install.sh && .venv/bin/thinkrl train ...
                    words = shlex.split(segment, comments=True) if "thinkrl" in segment else []
                    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value before a command
                        words = words[1:]
                    launcher = "thinkrl"
                    if words[:1] in (["thinkrl"], [".venv/bin/thinkrl"]):
                        words = words[1:]
                    elif words[:2] == ["accelerate", "launch"] and "-m" in words:
                        config = words[words.index("--config_file") + 1] if "--config_file" in words else None
                        assert config is None or (root / config).is_file(), f"{path.name}: {config} does not exist"
                        words = words[words.index("-m") + 2 :]
                        launcher = f"accelerate launch --config_file {config} -m thinkrl"
                    else:
                        continue
                    found.append((f"{path.name}: {launcher} {' '.join(words)}", words))
    return found


def dry_run_failures(commands, scratch: Path, capsys) -> list[str]:
    """Each distinct command once with --dry-run from ``scratch``; what failed, and folders written twice."""
    failures, writers = [], {}
    for where, argv in dict((w.split(": ", 1)[1], (w, a)) for w, a in commands).values():  # repeats: once
        if any("<" in word for word in argv):
            continue  # a placeholder for the reader's own recipe: its launch config was checked above
        capsys.readouterr()
        try:
            code = main([*argv, "--dry-run"])
        except SystemExit as exc:  # argparse: an unknown flag or subcommand
            code = exc.code
        out, err = capsys.readouterr()
        if code != 0:
            failures.append(f"{where} -> exit {code}: {(err.strip().splitlines() or ['?'])[-1]}")
            continue
        for folder in DECISION.findall(out):
            writers.setdefault(str((scratch / folder).resolve()), []).append(where)
    failures += [f"two examples write into {f}: {'; '.join(w)}" for f, w in writers.items() if len(w) > 1]
    return failures


@pytest.fixture(scope="module")
def after_quick_start(tmp_path_factory):
    """A scratch checkout-like folder (configs/, prompts/ linked) holding runs/default of a real quick-start run."""
    from thinkrl.config import load_config
    from thinkrl.run.trainer import Trainer

    scratch = tmp_path_factory.mktemp("newcomer")
    for name in ("configs", "prompts", "scripts"):
        (scratch / name).symlink_to(ROOT / name)
    quick = ["trainer.max_steps=2", "trainer.report_to=none", "trainer.progress=false"]
    Trainer(
        load_config(ROOT / "configs/default.yaml", [*quick, f"trainer.output_dir={scratch / 'runs/default'}"])
    ).train()
    return scratch


def test_every_documented_command_dry_runs_after_the_quick_start(after_quick_start, monkeypatch, capsys):
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    commands = documented_commands(files)
    assert len(commands) >= 15 and any(a[:1] == ["train"] for _, a in commands)
    monkeypatch.chdir(after_quick_start)
    failures = dry_run_failures(commands, after_quick_start, capsys)
    assert not failures, "\n".join(failures)


def test_the_check_catches_what_misled_newcomers(after_quick_start, monkeypatch, capsys, tmp_path):
    """The session-start README's mistakes, as they were written: a backend changed on the quick start's run, the
    2-process and fsdp2 launches that would only 'resume' it, an export of a checkpoint the default never writes;
    and an unknown flag and key."""
    launch = (
        "ACCELERATE_USE_CPU=true accelerate launch --config_file configs/accelerate/cpu-2proc.yaml -m thinkrl train"
    )
    page = tmp_path / "old.md"
    page.write_text(
        "```bash\n"
        "thinkrl train --config configs/default.yaml\n"
        "thinkrl train --config configs/default.yaml rollout.backend=vllm\n"
        f"{launch} --config configs/default.yaml\n"
        f"{launch} \\\n  --config configs/default.yaml trainer.sharding=fsdp2\n"
        "thinkrl export runs/default/checkpoint-100 exported/\n"
        "thinkrl eval --model runs/default --task text --no-such-flag\n"
        "thinkrl train --config configs/default.yaml trainer.no_such_key=1 trainer.output_dir=runs/x\n"
        "```\n"
    )
    monkeypatch.chdir(after_quick_start)
    failures = dry_run_failures(documented_commands([page]), after_quick_start, capsys)
    shown = "\n".join(failures)
    assert any("rollout.backend=vllm -> exit 2" in f and "rollout.backend (hf → vllm)" in f for f in failures), shown
    assert any("checkpoint-100" in f and "exit 2" in f for f in failures), shown
    assert any("--no-such-flag -> exit 2" in f and "unrecognized arguments" in f for f in failures), shown
    assert any("no_such_key=1" in f and "unknown config key" in f for f in failures), shown
    [twice] = [f for f in failures if f.startswith("two examples write into")]
    assert twice.count(";") == 2 and "trainer.sharding=fsdp2" in twice and "cpu-2proc.yaml" in twice, shown
