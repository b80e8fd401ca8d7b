"""Shared fixtures: the real slides and MIL data beside the checkout (../shared/data), small tmp results."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("WSI_SHARED_DATA", REPO.parent / "shared" / "data"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may touch a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `@pytest.mark.gpu` tests without a CUDA device; torch is imported only when such a test was collected."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(
            f"{SHARED_DATA}: shared test data not found; set WSI_SHARED_DATA to the folder holding slides/ and mil/"
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def cmu_slide(shared_data: Path) -> Path:
    return shared_data / "slides" / "cmu-1-small-region.svs"


@pytest.fixture(scope="session")
def tcga_slide(shared_data: Path) -> Path:
    return shared_data / "slides" / "tcga-cr-7395-01a-01-ts1.svs"


@pytest.fixture(scope="session")
def broken_slide(shared_data: Path) -> Path:
    return shared_data / "slides" / "broken.svs"


@pytest.fixture()
def truncated_cmu(cmu_slide: Path, tmp_path: Path) -> Path:
    """The CMU slide cut to 60% of its bytes, as an interrupted copy leaves it."""
    data = cmu_slide.read_bytes()
    out = tmp_path / "truncated.svs"
    out.write_bytes(data[: int(len(data) * 0.6)])
    return out


@pytest.fixture()
def copy_of(tmp_path: Path):
    def _copy(src: Path, name: str | None = None) -> Path:
        dst = tmp_path / (name or src.name)
        shutil.copy(src, dst)
        return dst

    return _copy
