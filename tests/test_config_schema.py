"""The shipped config validates, and the JSON schema in workflows/schemas is the one the models generate."""

from __future__ import annotations

import json
from pathlib import Path

from wsi_pipeline.config import config_json_schema, load_config

REPO = Path(__file__).resolve().parents[1]


def test_default_config_is_valid_and_points_at_the_demo() -> None:
    cfg = load_config(REPO / "workflows" / "config.yaml")
    assert cfg.tiling.tile_px == 256 and cfg.tiling.target_mpp == 0.5
    assert cfg.samples == "workflows/demo/samples.csv"


def test_schema_file_is_up_to_date() -> None:
    shipped = json.loads((REPO / "workflows" / "schemas" / "config.schema.json").read_text())
    assert shipped == config_json_schema(), "regenerate: wsi-pipeline schema --out workflows/schemas/config.schema.json"


def test_demo_sheet_is_valid() -> None:
    import os

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        cohort = load_config(REPO / "workflows" / "config.yaml").cohort()
    finally:
        os.chdir(cwd)
    assert len(cohort) == 21 and all(Path(p).exists() for p in cohort["path"])
    assert set(cohort["label"].dropna().astype(int)) == {0, 1}
