"""JSON in and out: the one sanitiser (numpy, paths, NaN) and atomic writes readers never see half-done."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import temporary_name


def to_jsonable(obj: Any) -> Any:
    """A copy of `obj` in plain JSON types: numpy scalars and arrays to Python, paths to str, NaN/inf to None.

    Used for sidecars, Zarr attributes and metrics alike, so a non-finite metric is `null` everywhere."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    if hasattr(obj, "model_dump"):  # pydantic models (typed sidecars, configs)
        return to_jsonable(obj.model_dump(mode="json"))
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write `obj` (sanitised) as JSON to a unique temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        tmp.write_text(json.dumps(to_jsonable(obj), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json(path: str | os.PathLike[str]) -> Any:
    return json.loads(Path(path).read_text())
