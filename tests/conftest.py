"""Shared fixtures: tiny configs and models built offline; nothing downloads."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from thinkrl.config import load_config  # noqa: E402

TINY = [
    "model.default.scratch.hidden_size=32",
    "model.default.scratch.num_layers=2",
    "model.default.scratch.num_heads=2",
    "model.default.scratch.intermediate_size=64",
    "data.interpreter_window=3",
    "data.n_ahead=2",
    "data.eval_positions=8",
    "rollout.num_thoughts=4",
    "rollout.max_thought_len=4",
    "trainer.batch_positions=4",
    "trainer.report_to=none",
    "trainer.progress=false",
    "trainer.eval_every=0",
    "trainer.save_every=0",
]


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` tests run only where CUDA is (``-m gpu`` selects them); elsewhere they skip, saying why."""
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="gpu test: needs a CUDA device (torch.cuda.is_available() is False)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def tiny_config(tmp_path):
    """Build a tiny synthetic-task config; extra dotted overrides win."""

    def make(*overrides: str):
        return load_config(None, [*TINY, f"trainer.output_dir={tmp_path / 'run'}", *overrides])

    return make


DEFAULT_RUN_120 = [  # the embedded default recipe for 120 steps, evaluated on 64 held-out positions
    "trainer.max_steps=120",
    "trainer.eval_every=0",
    "trainer.save_every=0",
    "trainer.report_to=none",
    "trainer.progress=false",
    "trainer.dump_rollouts=false",
    "data.eval_positions=64",
]


@pytest.fixture(scope="session")
def default_hf_run(tmp_path_factory, request):
    """``Trainer.train()``'s result for the default recipe over ``DEFAULT_RUN_120`` with the HF sampler: the
    learning test's run and the reference of the vLLM training test. Trained once per test session: pytest-xdist
    workers share it through a locked folder beside their own temporary folders."""
    import json
    from pathlib import Path

    from filelock import FileLock

    from thinkrl.run.trainer import Trainer

    worker = getattr(request.config, "workerinput", None)  # set on xdist workers only
    root = tmp_path_factory.getbasetemp()
    root = root.parent if worker is not None else root  # the session's folder, above the workers' own
    out, done = root / "default-hf" / "run", root / "default-hf" / "result.json"
    with FileLock(str(root / "default-hf.lock")):
        if not done.is_file():
            recipe = Path(__file__).resolve().parents[1] / "configs/default.yaml"
            result = Trainer(load_config(recipe, [*DEFAULT_RUN_120, f"trainer.output_dir={out}"])).train()
            done.write_text(json.dumps(result))
        return json.loads(done.read_text())


@pytest.fixture(scope="session")
def single_run(tmp_path_factory):
    """Two steps of the default recipe in one unsharded process (``launching.COMMON``): the reference run of the
    multi-process tests (DDP and FSDP2)."""
    from launching import ONE, ok, train

    out = tmp_path_factory.mktemp("single") / "run"
    ok(train(ONE, out, "trainer.max_steps=2"))
    return out
