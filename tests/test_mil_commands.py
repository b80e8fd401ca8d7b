"""The stage-3 verbs train / predict / bench-mil, run through typer's test runner on the root CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from typer.testing import CliRunner

from wsi_pipeline.cli import app

sys.path.insert(0, str(Path(__file__).parent))
from test_mil_train import CLS_TASK, FAST, make_cohort  # noqa: E402

runner = CliRunner()


def test_train_and_predict_commands(tmp_path):
    sheet, feats = make_cohort(tmp_path, n_patients=12)
    config = tmp_path / "mil.yaml"
    config.write_text(yaml.safe_dump({"tasks": [CLS_TASK], "train": FAST | {"epochs": 3}}))
    out = tmp_path / "mil"
    res = runner.invoke(
        app,
        [
            "train",
            "--sheet",
            str(sheet),
            "--features",
            str(feats),
            "--config",
            str(config),
            "--out",
            str(out),
            "--attention",
            str(tmp_path / "attention"),
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["task"] == "dx"
    assert (out / "dx" / "summary.json").exists() and any((tmp_path / "attention" / "dx").glob("*.zarr"))
    res = runner.invoke(
        app,
        [
            "predict",
            "--model",
            str(out / "dx"),
            "--features",
            str(feats),
            "--out",
            str(tmp_path / "pred.csv"),
            "P00-S0",
            "P01-S0",
        ],
    )
    assert res.exit_code == 0, res.output
    assert pd.read_csv(tmp_path / "pred.csv")["slide_id"].tolist() == ["P00-S0", "P01-S0"]
    bad = runner.invoke(
        app, ["predict", "--model", str(tmp_path), "--features", str(feats), "--out", str(tmp_path / "x.csv"), "P00-S0"]
    )
    assert bad.exit_code == 1 and "no trained model" in bad.output


def test_train_command_reports_bad_input_in_one_line(tmp_path):
    sheet, feats = make_cohort(tmp_path, n_patients=6)
    df = pd.read_csv(sheet)
    df.loc[0, "slide_id"] = "MISSING"
    df.to_csv(sheet, index=False)
    config = tmp_path / "mil.json"
    config.write_text(json.dumps({"tasks": [CLS_TASK], "train": FAST}))
    res = runner.invoke(
        app,
        [
            "train",
            "--sheet",
            str(sheet),
            "--features",
            str(feats),
            "--config",
            str(config),
            "--out",
            str(tmp_path / "mil"),
        ],
    )
    assert res.exit_code == 1
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "MISSING" in lines[0]


def test_bench_mil_command_prints_json_last_and_rejects_a_bad_readout(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for bag in range(40):  # a positive bag holds one shifted instance (the standard MIL assumption)
        label = bag % 2
        x = rng.normal(size=(int(rng.integers(3, 8)), 6))
        x[0, :2] += 4.0 * label
        rows += [f"{label},{bag}," + ",".join(f"{v:.5f}" for v in inst) for inst in x]
    csv = tmp_path / "toy.csv"
    csv.write_text("\n".join(rows) + "\n")
    res = runner.invoke(app, ["bench-mil", str(csv), "--folds", "2", "--repeats", "1"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["accuracy_mean"] > 0.8 and summary["accuracy_se"] >= 0
    bad = runner.invoke(app, ["bench-mil", str(csv), "--readout", "best"])
    assert bad.exit_code == 1 and "readout is 'average' or 'select'" in bad.output


def test_workflow_verb_unknown_task_is_one_line_error(tmp_path):
    """The mil-* verbs the Snakemake rules run end a user error with one line on stderr and exit 1."""
    from wsi_pipeline.cli import app as root_app

    demo_sheet = Path(__file__).resolve().parents[1] / "workflows" / "demo" / "samples.csv"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"samples": str(demo_sheet), "results": str(tmp_path / "results")}))
    res = runner.invoke(root_app, ["mil-sheet", "--config", str(config), "--task", "nope"])
    assert res.exit_code == 1
    assert res.output == "error: no task named 'nope' in the mil.tasks config; known: []\n"
