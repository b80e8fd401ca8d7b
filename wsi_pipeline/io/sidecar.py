"""The base of the per-slide JSON sidecars: a typed pydantic model, written atomically, read leniently.

Sidecars were plain dicts in earlier versions; `side["status"]` and `side.get("reason")` still read them."""

from __future__ import annotations

import os
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict

from .jsonio import read_json, write_json_atomic

S = TypeVar("S", bound="Sidecar")


class Sidecar(BaseModel):
    model_config = ConfigDict(extra="ignore")  # sidecars written by other versions stay readable

    def write(self, path: str | os.PathLike[str]) -> None:
        write_json_atomic(path, self.model_dump(mode="json"))

    @classmethod
    def read(cls: type[S], path: str | os.PathLike[str]) -> S:
        return cls.model_validate(read_json(path))

    def __getitem__(self, key: str) -> Any:
        if key not in type(self).model_fields:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default) if key in type(self).model_fields else default
