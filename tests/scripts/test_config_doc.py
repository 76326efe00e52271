"""docs/configuration.md is what scripts/config_doc.py generates from thinkrl/config.py: a key added to the config
without regenerating the page fails here."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_configuration_page_is_generated_from_config_py():
    done = subprocess.run(
        [sys.executable, "scripts/config_doc.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr


def test_every_config_key_with_a_help_text_is_on_the_page():
    from thinkrl.config import Config, to_dict
    from thinkrl.run.recipe import flatten

    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    keys = [k for k in flatten(to_dict(Config())) if not k.startswith("model.groups")]
    missing = [k for k in keys if f"| `{k}` |" not in page]
    assert keys and not missing, missing
