"""Reading YAML (or JSON) files: the one reader, so every bad file gives the same kind of one-line error."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError


def read_yaml_mapping(path: str | os.PathLike[str], *, missing_hint: str, mapping_hint: str) -> dict[str, Any]:
    """The file as a dict (an empty file is {}); a missing, unreadable or unparsable file, or one that is not a
    mapping, is one `ConfigError` line naming the file and, from the hints, the fix."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found; {missing_hint}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the file ({err.strerror or err}); {missing_hint}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())[:200]}); fix the file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file; save it as UTF-8 YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: {mapping_hint}, not {type(data).__name__}")
    return data
