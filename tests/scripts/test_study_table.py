"""scripts/study_table.py: the README's study table is read from study.json, cell by cell."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "study_table.py"


def _load():
    spec = importlib.util.spec_from_file_location("study_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stats(values: list[float], pooled: tuple[float, float, float] | None = None) -> dict:
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    out = {"mean": mean, "sd": sd, "n": len(values), "values": values}
    if pooled:
        out["pooled"] = {"value": pooled[0], "ci_low": pooled[1], "ci_high": pooled[2]}
    return out


def test_a_row_carries_each_metric_of_the_thought_point_and_the_baseline(tmp_path, capsys):
    thought = {
        "label": "thoughts",
        "n": 2,
        "metrics": {
            "sampled:4/nll": _stats([1.0, 1.2]),
            "null/nll": _stats([1.5, 1.5]),
            "none/nll": _stats([1.1, 1.3]),
            "sampled:4/delta_nll": _stats([0.5, 0.3], (0.4, 0.25, 0.55)),
            "sampled:4/delta_nll_none": _stats([0.1, 0.1], (0.1, -0.02, 0.2)),
            "sampled:4/null_rate": _stats([0.2, 0.4]),
            "sampled:4/thought_len": _stats([8.0, 10.0]),
            "sampled:4/unfinished_rate": _stats([1.0, 0.5]),
            "sampled:4/copy_rate": _stats([0.25, 0.125]),
            "matched_lm/delta_nll": _stats([-0.01, -0.03], (-0.02, -0.04, 0.001)),
        },
        "thoughts": {
            "helped": [
                {"folder": "x/seed-1", "id": 7, "thought": "a b", "vs_null": 0.25, "vs_none": 0.125, "gold": " 3"}
            ],
            "hurt": [],
        },
    }
    baseline = {"label": "lm", "n": 2, "metrics": {"none/nll": _stats([1.05, 1.15])}}
    (tmp_path / "study.json").write_text(json.dumps({"points": [baseline, thought]}))

    assert _load().main([f"a={tmp_path}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells == [
        "a",
        "2",
        "1.100",
        "1.500",
        "1.200",
        f"+0.4000 ± {0.1414:.4f} [+0.2500, +0.5500]",
        "+0.1000 ± 0.0000 [-0.0200, +0.2000]",
        "0.30",
        "9.0",
        "0.75",
        "0.188",
        "1.100",
        f"-0.0200 ± {0.0141:.4f} [-0.0400, +0.0010]",
    ]
    assert (
        '- (a, helped, seed-1, item 7) thought "a b": +0.2500 vs null, +0.1250 vs no thought per token; gold " 3"'
        in lines
    )


def test_a_folder_without_study_json_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="study.json"):
        _load().main([f"a={tmp_path}"])
