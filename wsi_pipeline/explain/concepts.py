"""Concept sets from YAML: the shipped ones in the repo's `workflows/concepts/` by name, or a user file by path.

A file holds `name` (optional: the file name without .yaml), `description` (optional), `templates` (each with one
`{}`) and `concepts` (a list of `{name, prompts: [...]}`). Every problem is one `ConfigError` line naming the
file and the fix. `prompt_set_hash` keys a cache of the set's text embeddings.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..errors import ConfigError
from ..io.yamlio import read_yaml_mapping
from .config import ConceptSet

SUFFIXES = (".yaml", ".yml", ".json")
# The repo's workflows/concepts beside the package; absent when wsi_pipeline is installed without the repo.
SHIPPED_DIR = Path(__file__).resolve().parents[2] / "workflows" / "concepts"
FORMAT_HINT = "see workflows/concepts/tissue.yaml for the format"


def default_search_dirs() -> list[Path]:
    """Where shipped sets are looked up by name: the repo's `workflows/concepts/` when it is there."""
    return [SHIPPED_DIR] if SHIPPED_DIR.is_dir() else []


def available_concept_sets(search_dirs: Sequence[str | os.PathLike[str]] | None = None) -> dict[str, Path]:
    """Shipped set name -> file, over `search_dirs` (default: `workflows/concepts/`); the first dir wins."""
    found: dict[str, Path] = {}
    for folder in default_search_dirs() if search_dirs is None else [Path(d) for d in search_dirs]:
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix in SUFFIXES and path.is_file():
                found.setdefault(path.stem, path)
    return found


def resolve_concept_set(
    name_or_path: str | os.PathLike[str], search_dirs: Sequence[str | os.PathLike[str]] | None = None
) -> Path:
    """The file behind a shipped set name or a path; a missing file or unknown name is one `ConfigError` line."""
    text = os.fspath(name_or_path).strip()
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if text.endswith(SUFFIXES) or "/" in text or os.sep in text or path.exists():
        raise ConfigError(
            f"{path}: concept set file not found; fix the path in explain.concept_sets or give a shipped set name"
        )
    shipped = available_concept_sets(search_dirs)
    if text in shipped:
        return shipped[text]
    if not shipped:
        raise ConfigError(
            f"concept set {text!r}: no shipped concept sets here (wsi_pipeline is installed without the repo's "
            "workflows/concepts/ folder); give the path to a YAML concept set in explain.concept_sets"
        )
    raise ConfigError(
        f"unknown concept set {text!r}; shipped sets: {', '.join(sorted(shipped))}; or give the path to a YAML file"
    )


def load_concept_set(
    name_or_path: str | os.PathLike[str],
    search_dirs: Sequence[str | os.PathLike[str]] | None = None,
    *,
    softmax: bool = False,
) -> ConceptSet:
    """A validated concept set from a shipped name (`workflows/concepts/NAME.yaml`) or a YAML path.
    `softmax=True` also asks for at least two concepts (zero-shot classification over the set)."""
    path = resolve_concept_set(name_or_path, search_dirs)
    data = _read_mapping(path)
    data.setdefault("name", path.stem)
    try:
        concept_set = ConceptSet.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{path}: {_describe(err)}") from None
    if softmax:
        try:
            concept_set.require_softmax()
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    return concept_set


def load_concept_sets(
    names_or_paths: Sequence[str | os.PathLike[str]],
    search_dirs: Sequence[str | os.PathLike[str]] | None = None,
    *,
    softmax: bool = False,
) -> list[ConceptSet]:
    """Every set of `explain.concept_sets`, in order; two sets with one name (outputs are keyed by it) is an error."""
    sets = [load_concept_set(n, search_dirs, softmax=softmax) for n in names_or_paths]
    seen: dict[str, str] = {}
    for entry, s in zip(names_or_paths, sets, strict=True):
        if s.name in seen:
            raise ConfigError(
                f"concept sets {seen[s.name]!r} and {os.fspath(entry)!r} are both named {s.name!r}; "
                "give one a different `name:` in its file"
            )
        seen[s.name] = os.fspath(entry)
    return sets


def prompt_set_hash(concept_set: ConceptSet) -> str:
    """sha256 of a canonical JSON of the templates and concepts (names, prompts, order): a key for cached text
    embeddings. The set's name and description do not count; any change to a prompt or template does."""
    canonical = {
        "templates": concept_set.templates,
        "concepts": [{"name": c.name, "prompts": c.prompts} for c in concept_set.concepts],
    }
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read_mapping(path: Path) -> dict[str, Any]:
    return read_yaml_mapping(
        path,
        missing_hint="check the path",
        mapping_hint=f"a concept set must be a mapping with templates: and concepts:; {FORMAT_HINT}",
    )


def _describe(err: ValidationError) -> str:
    """Pydantic's errors as one line: where in the file (concepts[2].prompts) and what to fix."""
    parts, hint = [], ""
    for e in err.errors()[:3]:
        where = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in e["loc"]).lstrip(".") or "concept set"
        parts.append(f"{where}: {str(e['msg']).removeprefix('Value error, ')}")
        hint = hint or ("" if e["type"] == "value_error" else f"; {FORMAT_HINT}")
    more = len(err.errors()) - 3
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "") + hint
