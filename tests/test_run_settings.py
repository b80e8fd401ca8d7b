"""Run settings snapshots (wsi_pipeline/run_settings.py): what each scope holds, written once, refused when edited,
read back as the config of the results folder they sit in, superseded ones pruned."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsi_pipeline import run_settings as rs
from wsi_pipeline.config import load_config
from wsi_pipeline.errors import ConfigError

CONFIG = {
    "samples": "/data/sheet.csv",
    "results": "/data/results",
    "mil": {
        "tasks": [
            {"name": "dx", "label": "label"},
            {"name": "zs", "type": "zero-shot", "label": "label", "class_prompts": {"a": ["x"], "b": ["y"]}},
        ],
        "train": {"epochs": 30},
    },
}


def snapshot_of(cfg: dict, scope: str, fn, *args) -> str:
    return rs.settings_name(scope, rs.settings_text(scope, fn(load_config(cfg), *args)))


def test_each_scope_changes_only_with_what_it_uses() -> None:
    other_epochs = CONFIG | {"mil": CONFIG["mil"] | {"train": {"epochs": 5}}}
    other_mpp = CONFIG | {"tiling": {"target_mpp": 1.0}}
    for cfg, changed in ((other_epochs, {"task-dx"}), (other_mpp, {"tile"})):
        scopes = {
            "tile": (rs.tile_settings,),
            "encode": (rs.encode_settings,),
            "task-dx": (rs.task_settings, "dx"),
            "task-zs": (rs.task_settings, "zs"),
        }
        differ = {s for s, (fn, *a) in scopes.items() if snapshot_of(cfg, s, fn, *a) != snapshot_of(CONFIG, s, fn, *a)}
        assert differ == changed
    # a moved results folder names the same snapshots: the folder is where the snapshot sits, not in it
    moved = CONFIG | {"results": "/elsewhere/results"}
    same = [snapshot_of(cfg, "task-dx", rs.task_settings, "dx") for cfg in (moved, CONFIG)]
    assert same[0] == same[1]


def test_written_once_read_back_with_its_folder_and_edits_refused(tmp_path: Path) -> None:
    text = rs.settings_text("task-dx", rs.task_settings(load_config(CONFIG), "dx"))
    path = tmp_path / "results" / "settings" / f"{rs.settings_name('task-dx', text)}.yaml"
    rs.write_settings(path, text)
    stamp = path.stat().st_mtime_ns
    rs.write_settings(path, text)
    assert path.stat().st_mtime_ns == stamp  # never rewritten
    cfg = load_config(path)
    assert Path(cfg.results) == tmp_path / "results" and cfg.mil.train.epochs == 30
    assert [t.name for t in cfg.mil.tasks] == ["dx"]
    path.write_text(text.replace("epochs: 30", "epochs: 5"))
    with pytest.raises(ConfigError, match="was changed after it was written"):
        rs.write_settings(path, text)
    with pytest.raises(ConfigError, match="does not match the file's digest"):
        rs.write_settings(path.with_name("task-dx-000000000000.yaml"), text)


def test_superseded_snapshots_of_the_running_scopes_are_pruned(tmp_path: Path) -> None:
    names = ["tile-aaaaaaaaaaaa", "tile-bbbbbbbbbbbb", "task-dx-cccccccccccc", "task-dx_2-dddddddddddd", "notes"]
    for name in names:
        (tmp_path / f"{name}.yaml").write_text("x")
    removed = rs.prune_superseded(tmp_path, ["tile-bbbbbbbbbbbb", "task-dx-eeeeeeeeeeee"])
    assert sorted(p.name for p in removed) == ["task-dx-cccccccccccc.yaml", "tile-aaaaaaaaaaaa.yaml"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "notes.yaml",
        "task-dx_2-dddddddddddd.yaml",
        "tile-bbbbbbbbbbbb.yaml",
    ]
