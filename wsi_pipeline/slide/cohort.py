"""The cohort: a validated sample sheet (CSV) or a folder glob, one row per slide.

Sample sheet columns: `slide_id`, `path` (relative paths are resolved against the sheet's folder), optional `mpp`
(overrides the slide metadata), `patient_id` (defaults to `slide_id`) and any label columns (kept as they are).
Duplicate ids and bad values stop the run with one line listing every offender; a missing file does not: that slide
is recorded as failed in the report and the others go on.
"""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ConfigError
from .ids import default_slide_id, slide_id_problem
from .reader import MPP_PLAUSIBLE

log = logging.getLogger(__name__)

REQUIRED = ("slide_id", "path")


def read_sample_sheet(csv_path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read and validate a sample sheet; returns it indexed by `slide_id` with absolute `path`s."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise ConfigError(
            f"{csv_path}: sample sheet not found; set 'samples' in the config to a CSV with columns "
            "slide_id,path[,mpp,patient_id,labels...]"
        )
    try:
        sheet = pd.read_csv(csv_path, dtype={"slide_id": str, "path": str, "patient_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"{csv_path}: not a readable CSV ({str(err).splitlines()[0]}); save it as "
            "comma-separated UTF-8 with a header row"
        ) from err
    sheet.columns = [str(c).strip() for c in sheet.columns]
    missing = [c for c in REQUIRED if c not in sheet.columns]
    if missing:
        raise ConfigError(
            f"{csv_path}: missing column(s) {', '.join(missing)}; the sample sheet needs "
            f"{', '.join(REQUIRED)} (found: {', '.join(sheet.columns)})"
        )
    return validate_cohort(sheet, base_dir=csv_path.parent, source=str(csv_path))


def cohort_from_glob(pattern: str) -> pd.DataFrame:
    """A cohort from a glob such as `/data/slides/*.svs`; slide ids are the file names without extension."""
    paths = sorted(glob.glob(os.path.expanduser(pattern)))
    if not paths:
        raise ConfigError(f"{pattern}: no slides match this glob; check the 'samples' pattern in the config")
    sheet = pd.DataFrame({"slide_id": [default_slide_id(p) for p in paths], "path": paths})
    return validate_cohort(sheet, base_dir=Path.cwd(), source=pattern)


def validate_cohort(sheet: pd.DataFrame, base_dir: Path, source: str) -> pd.DataFrame:
    sheet = sheet.copy()
    problems: list[str] = []
    ids = sheet["slide_id"].astype("string").str.strip()
    empty = sheet.index[ids.isna() | (ids == "")].tolist()
    if empty:
        problems.append(f"empty slide_id on row(s) {_rows(empty)}")
    bad_chars = [s for s in ids.dropna() if s and slide_id_problem(s)]
    if bad_chars:
        problems.append(
            f"slide_id with characters other than letters, digits, '.', '_', '-': {bad_chars[:5]} (the file name "
            f"gives a valid id: {default_slide_id(bad_chars[0])!r})"
        )
    dup = ids[ids.duplicated(keep=False) & ids.notna()]
    if len(dup):
        problems.append(f"duplicate slide_id {sorted(set(dup))} on rows {_rows(dup.index.tolist())}")
    paths = sheet["path"].astype("string").str.strip()
    no_path = sheet.index[paths.isna() | (paths == "")].tolist()
    if no_path:
        problems.append(f"empty path on row(s) {_rows(no_path)}")
    if "mpp" in sheet.columns:
        mpp = pd.to_numeric(sheet["mpp"], errors="coerce")
        lo, hi = MPP_PLAUSIBLE  # the range stage 1 accepts: a value outside fails here, before anything starts
        bad = sheet.index[(sheet["mpp"].notna() & mpp.isna()) | (mpp < lo) | (mpp > hi)].tolist()
        if bad:
            problems.append(
                f"mpp must be microns per pixel in [{lo}, {hi}] (e.g. 0.25 or 0.5): bad on row(s) {_rows(bad)}"
            )
        sheet["mpp"] = mpp
    else:
        sheet["mpp"] = np.nan
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    sheet["slide_id"] = ids.astype(str)
    sheet["path"] = [str(_absolute(p, base_dir)) for p in paths]
    if "patient_id" not in sheet.columns:
        sheet["patient_id"] = sheet["slide_id"]
    sheet["patient_id"] = sheet["patient_id"].fillna(sheet["slide_id"]).astype(str)
    missing_files = [sid for sid, p in zip(sheet["slide_id"], sheet["path"], strict=True) if not Path(p).exists()]
    if missing_files:
        log.warning(
            "%s: %d slide file(s) not found, they will be reported as failed: %s",
            source,
            len(missing_files),
            ", ".join(missing_files[:10]),
        )
    return sheet.set_index("slide_id", drop=False)


def _absolute(p: str, base_dir: Path) -> Path:
    path = Path(os.path.expanduser(p))
    return path if path.is_absolute() else (base_dir / path).resolve()


def _rows(index: list[int]) -> str:
    # +2: one for the header line, one because people count rows from 1
    return ", ".join(str(i + 2) for i in index[:10]) + (" ..." if len(index) > 10 else "")


def slide_mpp(sheet: pd.DataFrame, slide_id: str) -> float | None:
    value = sheet.loc[slide_id, "mpp"]
    return None if pd.isna(value) else float(value)
