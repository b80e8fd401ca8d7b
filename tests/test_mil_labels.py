"""A task's targets are checked before anything is trained (issue 16): label typos, one-class tasks, survival
without events, zero-shot prompts for absent classes, blank targets listed, and bags independent of row order."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.test_mil_train import CLS_TASK, FAST, SURV_TASK, make_cohort
from wsi_pipeline.errors import TrainingDataError
from wsi_pipeline.mil.bags import bags_from_sheet, load_sheet
from wsi_pipeline.mil.config import TaskConfig
from wsi_pipeline.mil.labels import looks_like_typo, one_edit_apart
from wsi_pipeline.mil.train import train_task
from wsi_pipeline.mil.workflow import describe_targets, write_task_sheet


def levenshtein(a: str, b: str) -> int:
    """The textbook dynamic programme, to check the one-edit shortcut against."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def test_one_edit_apart_agrees_with_levenshtein() -> None:
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abc"), rng.integers(0, 5))) for _ in range(120)]
    for a, b in itertools.product(words[:60], words[60:]):
        assert (one_edit_apart(a, b) is not None) == (levenshtein(a, b) == 1), (a, b)


@pytest.mark.parametrize(
    ("a", "b", "typo"),
    [
        ("tumor", "tumour", True),
        ("Tumour", "tumour ", True),
        ("Kolorektal", "kolorektál", True),
        ("normal", "nornal", True),
        ("adenocarcinoma", "adenocarcinomas", True),
        ("stage I", "stage II", False),
        ("LumA", "LumB", False),
        ("MSI-H", "MSI-L", False),
        ("HER2+", "HER2-", False),
        ("grade 1", "grade 2", False),
        ("0", "1", False),
        ("luad", "lusc", False),
    ],
)
def test_which_label_pairs_look_like_typos(a: str, b: str, typo: bool) -> None:
    assert looks_like_typo(a, b) is typo


def sheet_with(tmp_path: Path, labels: list[str | None], **columns: list) -> Path:
    rows = {"slide_id": [f"s{i}" for i in range(len(labels))], "patient_id": [f"p{i}" for i in range(len(labels))]}
    path = tmp_path / "sheet.csv"
    pd.DataFrame(rows | {"label": labels} | columns).to_csv(path, index=False)
    return path


def test_a_typo_in_the_labels_is_refused_in_one_line_naming_values_and_slides(tmp_path: Path) -> None:
    sheet = sheet_with(tmp_path, ["tumor"] * 5 + ["normal"] * 5 + ["tumour"])
    task = TaskConfig(name="dx", label="label")
    with pytest.raises(TrainingDataError) as err:
        load_sheet(sheet, task)
    msg = str(err.value)
    assert "\n" not in msg and "'tumor' (5 slides) vs 'tumour' (1" in msg and "on s10" in msg and "classes:" in msg
    # the task lists its classes: both are kept apart, and any other value is refused
    df, classes = load_sheet(sheet, TaskConfig(name="dx", label="label", classes=["normal", "tumor", "tumour"]))
    assert classes == ["normal", "tumor", "tumour"] and df["_target"].nunique() == 3
    with pytest.raises(TrainingDataError, match=r"labels \['tumour'\] not in classes"):
        load_sheet(sheet, TaskConfig(name="dx", label="label", classes=["normal", "tumor"]))


def test_a_one_class_task_and_a_survival_task_without_events_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TrainingDataError, match="needs at least two classes in column 'label'.*found 'tumor'"):
        load_sheet(sheet_with(tmp_path, ["tumor"] * 6 + [None]), TaskConfig(name="dx", label="label"))
    no_events = sheet_with(tmp_path, ["a"] * 4, time=[1.0, 2.0, 3.0, 4.0], event=[0, 0, 0, 0])
    with pytest.raises(TrainingDataError, match="survival task 'os' has no events .* all 4 patients"):
        load_sheet(no_events, TaskConfig(name="os", type="survival", time="time", event="event"))


def test_zero_shot_prompts_must_name_exactly_the_labels_classes(tmp_path: Path) -> None:
    sheet = sheet_with(tmp_path, ["benign", "tumour"] * 3)
    prompts = {"benign": ["stroma"], "tumour": ["tumour cells"], "necrosis": ["necrotic debris"]}
    task = TaskConfig(name="zs", type="zero-shot", label="label", class_prompts=prompts)
    with pytest.raises(TrainingDataError, match=r"prompts class\(es\) \['necrosis'\] that no slide has"):
        load_sheet(sheet, task)


def test_blank_targets_are_listed_in_excluded_csv(tmp_path: Path) -> None:
    results = tmp_path / "results"
    cohort = pd.DataFrame(
        {"slide_id": ["a", "b", "c"], "path": ["/a", "/b", "/c"], "label": ["x", None, "y"], "time": [1.0, 2.0, None]}
    ).set_index("slide_id", drop=False)
    write_task_sheet(cohort, results, "enc", TaskConfig(name="dx", label="label"))
    excluded = pd.read_csv(results / "mil" / "dx" / "excluded.csv").set_index("slide_id")
    assert excluded.loc["b", "reason"] == "no value in column 'label' for task 'dx'"
    assert excluded.loc["a", "encode_status"] == "not encoded"  # no features either: listed with that reason
    survival = TaskConfig(name="os", type="survival", time="time", event="label")
    write_task_sheet(cohort, results, "enc", survival)
    excluded = pd.read_csv(results / "mil" / "os" / "excluded.csv").set_index("slide_id")
    assert excluded.loc["c", "reason"] == "no value in column 'time' for task 'os'"


def test_row_order_of_the_sheet_changes_nothing(tmp_path: Path) -> None:
    sheet, feats = make_cohort(tmp_path, n_patients=12)
    shuffled = tmp_path / "shuffled.csv"
    pd.read_csv(sheet).sample(frac=1.0, random_state=7).to_csv(shuffled, index=False)
    task = TaskConfig.model_validate(CLS_TASK)
    bags = [bags_from_sheet(load_sheet(s, task)[0], task) for s in (sheet, shuffled)]
    assert [(b.bag_id, b.slide_ids) for b in bags[0]] == [(b.bag_id, b.slide_ids) for b in bags[1]]
    solo = TaskConfig.model_validate(CLS_TASK | {"pool_slides": False})
    per_slide = [[b.bag_id for b in bags_from_sheet(load_sheet(s, solo)[0], solo)] for s in (sheet, shuffled)]
    assert per_slide[0] == per_slide[1]
    fast = FAST | {"epochs": 3, "patience": 3, "folds": 2}
    weights = []
    for name, path in (("a", sheet), ("b", shuffled)):
        train_task(path, feats, CLS_TASK, fast, tmp_path / name, fold=0)
        weights.append((tmp_path / name / "fold00" / "model.safetensors").read_bytes())
    assert weights[0] == weights[1]  # bit for bit on the CPU
    assert describe_targets(sheet, task) == "slides per 'diagnosis' value: benign: 8, tumour: 7"
    assert describe_targets(sheet, TaskConfig.model_validate(SURV_TASK)).endswith("patients (15 slides)")
