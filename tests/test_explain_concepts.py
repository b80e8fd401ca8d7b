"""Concept sets for stage 4: shipped sets load, prompts x templates expansion, the prompt hash, one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.explain.concepts import (
    SHIPPED_DIR,
    available_concept_sets,
    load_concept_set,
    load_concept_sets,
    prompt_set_hash,
)
from wsi_pipeline.explain.config import ConceptSet, ExplainConfig

REPO = Path(__file__).resolve().parents[1]


def write_set(tmp_path: Path, data: Any, name: str = "mine.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def small_set(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "small",
        "templates": ["an H&E image of {}.", "a histopathology photo of {}."],
        "concepts": [
            {"name": "tumour", "prompts": ["tumor epithelium", "carcinoma cells"]},
            {"name": "stroma", "prompts": ["tumor stroma"]},
        ],
    }
    data.update(changes)
    return data


def one_line_error(path_or_name: Any, *fragments: str, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_concept_set(path_or_name, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_shipped_sets_load_and_validate() -> None:
    assert SHIPPED_DIR == REPO / "workflows" / "concepts"
    shipped = available_concept_sets()
    assert {"tissue", "lesion"} <= set(shipped)
    for name in shipped:
        s = load_concept_set(name, softmax=True)
        assert s.name == name
        assert all(2 <= len(c.prompts) <= 4 for c in s.concepts), name
        texts = s.prompt_texts()
        assert len(texts) == len(s.concepts)
        assert all("{}" not in t for ts in texts for t in ts)
    tissue = load_concept_set("tissue")
    for needed in ("tumour epithelium", "stroma", "lymphocytes", "necrosis", "mucin", "adipose", "blood"):
        assert needed in tissue.concept_names
    lesion = load_concept_set("lesion")
    for needed in ("infiltrative border", "nuclear pleomorphism", "high mitotic activity"):
        assert needed in lesion.concept_names


def test_default_explain_config_names_shipped_sets() -> None:
    cfg = ExplainConfig()
    assert cfg.top_k_tiles == 8 and cfg.captioner is None
    assert [s.name for s in load_concept_sets(cfg.concept_sets, softmax=True)] == cfg.concept_sets
    with pytest.raises(ValueError, match="model_id or path"):
        ExplainConfig.model_validate({"captioner": {"tiles_per_slide": 2}})
    with pytest.raises(ValueError, match="twice"):
        ExplainConfig(concept_sets=["tissue", "tissue"])


def test_prompts_times_templates_in_order(tmp_path: Path) -> None:
    s = load_concept_set(write_set(tmp_path, small_set()))
    assert s.prompt_texts() == [
        [
            "an H&E image of tumor epithelium.",
            "a histopathology photo of tumor epithelium.",
            "an H&E image of carcinoma cells.",
            "a histopathology photo of carcinoma cells.",
        ],
        ["an H&E image of tumor stroma.", "a histopathology photo of tumor stroma."],
    ]


def test_prompts_are_stripped_and_name_defaults_to_file_stem(tmp_path: Path) -> None:
    data = small_set()
    del data["name"]
    data["concepts"][1]["prompts"] = ["  tumor stroma "]
    s = load_concept_set(write_set(tmp_path, data, "my_set.yml"))
    assert s.name == "my_set"
    assert s.concepts[1].prompts == ["tumor stroma"]


def test_hash_is_stable_and_follows_prompts(tmp_path: Path) -> None:
    a = load_concept_set(write_set(tmp_path, small_set(), "a.yaml"))
    b = load_concept_set(write_set(tmp_path, small_set(name="other", description="x"), "b.yaml"))
    assert prompt_set_hash(a) == prompt_set_hash(b)  # name and description do not count
    assert len(prompt_set_hash(a)) == 64
    assert prompt_set_hash(load_concept_set("tissue")) == prompt_set_hash(load_concept_set("tissue"))
    changed = small_set()
    changed["concepts"][0]["prompts"][1] = "malignant epithelial cells"
    assert prompt_set_hash(ConceptSet.model_validate(changed)) != prompt_set_hash(a)
    retemplated = small_set(templates=["an H&E image of {}."])
    assert prompt_set_hash(ConceptSet.model_validate(retemplated)) != prompt_set_hash(a)
    reordered = small_set()
    reordered["concepts"].reverse()
    assert prompt_set_hash(ConceptSet.model_validate(reordered)) != prompt_set_hash(a)


def test_empty_prompt(tmp_path: Path) -> None:
    data = small_set()
    data["concepts"][0]["prompts"].append("   ")
    path = write_set(tmp_path, data)
    one_line_error(path, str(path), "concepts[0]", "'tumour' has an empty prompt")


def test_duplicate_concept_names_case_insensitive(tmp_path: Path) -> None:
    data = small_set()
    data["concepts"].append({"name": "Stroma", "prompts": ["collagen"]})
    path = write_set(tmp_path, data)
    one_line_error(path, str(path), "'stroma' and 'Stroma' clash", "rename one")


def test_template_needs_exactly_one_placeholder(tmp_path: Path) -> None:
    for bad in ["an H&E image.", "{} and {}"]:
        path = write_set(tmp_path, small_set(templates=[bad]))
        one_line_error(path, str(path), "templates", "exactly one {}")


def test_one_concept_for_a_softmax(tmp_path: Path) -> None:
    data = small_set(name="lonely")
    data["concepts"] = data["concepts"][:1]
    path = write_set(tmp_path, data)
    assert load_concept_set(path).concept_names == ["tumour"]  # fine for similarity scores
    one_line_error(path, str(path), "'lonely'", "at least 2", softmax=True)


def test_no_concepts_or_no_templates(tmp_path: Path) -> None:
    path = write_set(tmp_path, small_set(concepts=[]))
    one_line_error(path, str(path), "concepts", "at least 1")
    data = small_set()
    del data["templates"]
    path = write_set(tmp_path, data)
    one_line_error(path, str(path), "templates", "required", "workflows/concepts/tissue.yaml")


def test_missing_file_and_unknown_name(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    one_line_error(missing, str(missing), "not found")
    one_line_error("no_such_set", "unknown concept set 'no_such_set'", "lesion", "tissue")


def test_no_shipped_folder_only_paths_work(tmp_path: Path) -> None:
    one_line_error("tissue", "no shipped concept sets", "path", search_dirs=[tmp_path / "absent"])
    path = write_set(tmp_path, small_set())
    assert load_concept_set(path, search_dirs=[]).name == "small"


def test_search_dirs_find_user_sets_by_name(tmp_path: Path) -> None:
    write_set(tmp_path, small_set(), "custom.yaml")
    assert load_concept_set("custom", search_dirs=[tmp_path]).name == "small"


def test_bad_yaml_and_not_a_mapping(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("concepts: [unclosed\n")
    one_line_error(bad, str(bad), "not valid YAML")
    listed = write_set(tmp_path, ["a", "b"], "list.yaml")
    one_line_error(listed, str(listed), "must be a mapping")


def test_two_sets_with_one_name(tmp_path: Path) -> None:
    a = write_set(tmp_path, small_set(), "a.yaml")
    b = write_set(tmp_path, small_set(), "b.yaml")
    with pytest.raises(ConfigError, match="both named 'small'"):
        load_concept_sets([a, b])
