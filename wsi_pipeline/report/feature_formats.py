"""Feature export in the file layouts of CLAM, TRIDENT and STAMP (`wsi-pipeline export-features`).

Every layout is what that tool's own code writes and reads, matched against its source:

- CLAM, mahmoodlab/CLAM master @ 53e2409d4a8189c682c173382964a85f114f923c. `extract_features_fp.py` writes
  `h5_files/{slide}.h5` through `utils/file_utils.save_hdf5` (`features` float32 (N, D), `coords` int32 (N, 2)
  level-0 top-left) and `pt_files/{slide}.pt` = `torch.save(torch.from_numpy(features))`;
  `dataset_modules/dataset_generic.py` `Generic_MIL_Dataset.__getitem__` loads `torch.load(pt_files/{slide_id}.pt)`,
  or, after `load_from_h5(True)`, `h5_files/{slide_id}.h5` `['features'][:]` and `['coords'][:]`. The coords carry
  CLAM's patching attributes (`coords_attrs`: patch_size at patch_level, patch_level, downsample, ...).
- TRIDENT, mahmoodlab/TRIDENT main @ a91fa8490e0210ebbbe58452c3babe009e0ab7ca. `Processor.
  run_patch_feature_extraction_job` saves to `{coords_dir}/features_{encoder}/{slide}.h5` through
  `WSI.extract_patch_features` -> `IO.save_h5`: `features` (N, D) with attrs name, savetodir, encoder; `coords`
  (N, 2) int64 level-0 with the attrs of `IO.coords_to_h5` (patch_size at the target magnification,
  patch_size_level0, level0_magnification, target_magnification, overlap in target pixels, name, savetodir,
  level0_width, level0_height), read back by `IO.read_coords` and `WSI.extract_slide_features`. `--out` plays the
  role of TRIDENT's `{mag}x_{px}px_{overlap}px_overlap` coords folder.
- STAMP, KatherLab/STAMP v2.5.0 @ c54ce06739622c127a83eccb35a7082e504b9aef. `stamp.preprocessing.extract_` writes
  `{output_dir}/{extractor}/{slide}.h5`: `feats` (N, D) float16, `coords` (N, 2) float32 micrometres of each
  tile's level-0 top-left, root attrs extractor, unit "um", tile_size_um, tile_size_px, feat_type "tile".
  `stamp.modeling.data.get_coords` takes coords as micrometres when `tile_size_um` is set, `tile_size_px` gives
  the MPP, `detect_feature_type` reads `feat_type`, the bag datasets read `feats`. Not written: `stamp_version`
  (`get_coords` refuses a file whose stamp_version is newer than the installed STAMP, and STAMP did not make these
  files) and `code_hash` (a hash of STAMP's own preprocessing code). `feats` keep the store's dtype (float16 by
  default, as STAMP writes; STAMP casts to float32 when it loads).

Provenance (encoder, model id, revision, weights sha256, package versions, tile geometry: `provenance_attrs`) sits
on the features dataset of every HDF5 file. Every store is checked (complete, coords equal to its tile table)
before any file is written; each file is written under a temporary name beside it and renamed when complete.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .. import __version__
from ..encode.store import is_complete_store
from ..errors import ConfigError, FeatureError
from ..io.atomic import temporary_name
from ..layout import ResultsLayout
from .export import FeatureStoreData, check_feature_store, coords_attrs, provenance_attrs

FORMATS = ("clam", "trident", "stamp")


@dataclass
class ExportResult:
    """The files written and, one line each, the slides left out with the reason."""

    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _shown(names: list[str]) -> str:
    return ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")


def select_stores(
    results: str | os.PathLike[str], encoder: str, slide_ids: list[str] | None = None
) -> tuple[list[Path], list[str]]:
    """Feature stores to export: every complete one of `encoder` (incomplete ones noted), or exactly `slide_ids`."""
    layout = ResultsLayout(results)
    root = layout.feature_dir(encoder)
    if slide_ids:
        wanted = list(dict.fromkeys(slide_ids))
        missing = [s for s in wanted if not layout.feature_store(encoder, s).exists()]
        if missing:
            raise FeatureError(
                f"{root}: no feature store for {len(missing)} slide(s) ({_shown(missing)}); "
                "run `wsi-pipeline encode` for them"
            )
        return [layout.feature_store(encoder, s) for s in wanted], []  # an incomplete one is refused when checked
    found = sorted(p for p in root.glob("*.zarr") if p.is_dir()) if root.is_dir() else []
    if not found:
        raise FeatureError(f"{root}: no feature stores found; run `wsi-pipeline encode` first")
    complete = [p for p in found if is_complete_store(p)]
    incomplete = [p.name.removesuffix(".zarr") for p in found if p not in complete]
    if not complete:
        raise FeatureError(
            f"{root}: no complete feature store ({len(incomplete)} incomplete: {_shown(incomplete)}); "
            "run `wsi-pipeline encode` again"
        )
    notes = [f"{s}: skipped, not a complete feature store; run `wsi-pipeline encode` again" for s in incomplete]
    return complete, notes


def _atomic_file(path: Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` to a temporary name beside `path`, then rename it over `path`; nothing left on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _set_attrs(node: h5py.Dataset | h5py.File, attrs: Mapping[str, object]) -> None:
    for k, v in attrs.items():
        node.attrs[k] = v


def write_clam(data: FeatureStoreData, out: Path, encoder: str) -> list[Path]:
    """`out/h5_files/{slide}.h5` (features float32, coords int32 + CLAM attrs) and `out/pt_files/{slide}.pt`."""
    import torch

    feats = np.ascontiguousarray(data.features(), dtype=np.float32)
    coords = data.table.coords
    if coords.size and (coords.min() < 0 or coords.max() > np.iinfo(np.int32).max):
        raise FeatureError(f"{data.store}: level-0 coords do not fit CLAM's int32 coords")

    def h5(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            _set_attrs(f.create_dataset("features", data=feats), provenance_attrs(data))
            _set_attrs(f.create_dataset("coords", data=coords.astype(np.int32)), coords_attrs(data.table))

    def pt(tmp: Path) -> None:
        torch.save(torch.from_numpy(feats), tmp)

    name = data.slide_id
    return [
        _atomic_file(out / "h5_files" / f"{name}.h5", h5),
        _atomic_file(out / "pt_files" / f"{name}.pt", pt),
    ]


def trident_coords_attrs(data: FeatureStoreData, coords_dir: Path) -> dict[str, object]:
    """TRIDENT's `coords` attributes (`IO.coords_to_h5`): sizes at the target magnification, magnification = 10/MPP."""
    t = data.table.attrs
    tile_px = int(t["tile_px"])
    width, height = (int(v) for v in t["slide_dimensions"])
    return {
        "patch_size": tile_px,  # TRIDENT: at the target magnification (CLAM's patch_size is at patch_level)
        "patch_size_level0": int(round(float(t["tile_size_level0"]))),
        "level0_magnification": 10.0 / float(t["slide_mpp"]),  # TRIDENT: pixel size = 10 / magnification
        "target_magnification": 10.0 / float(t["target_mpp"]),
        "overlap": int(round(float(t.get("overlap", 0.0)) * tile_px)),  # TRIDENT: pixels at the target
        "name": data.slide_id,
        "savetodir": str(coords_dir),
        "level0_width": width,
        "level0_height": height,
    }


def write_trident(data: FeatureStoreData, out: Path, encoder: str) -> list[Path]:
    """`out/features_{encoder}/{slide}.h5`: features float32 (name, savetodir, encoder + provenance), coords int64."""
    feats = np.asarray(data.features(), dtype=np.float32)
    save_dir = out / f"features_{encoder}"
    feature_attrs = provenance_attrs(data) | {
        "name": data.slide_id,
        "savetodir": str(save_dir.resolve()),
        "encoder": encoder,
    }

    def h5(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            _set_attrs(f.create_dataset("features", data=feats), feature_attrs)
            coords = f.create_dataset("coords", data=data.table.coords.astype(np.int64))
            _set_attrs(coords, trident_coords_attrs(data, out.resolve()))

    return [_atomic_file(save_dir / f"{data.slide_id}.h5", h5)]


def stamp_attrs(data: FeatureStoreData, encoder: str) -> dict[str, object]:
    """STAMP's file attributes (`stamp.preprocessing.extract_`), less stamp_version and code_hash."""
    t = data.table.attrs
    return {
        "extractor": encoder,
        "unit": "um",
        "tile_size_um": float(t["tile_px"]) * float(t["target_mpp"]),
        "tile_size_px": int(t["tile_px"]),
        "feat_type": "tile",
        "exported_by": f"wsi_pipeline {__version__}",
    }


def write_stamp(data: FeatureStoreData, out: Path, encoder: str) -> list[Path]:
    """`out/{encoder}/{slide}.h5`: feats (store dtype, provenance attrs), coords float32 in micrometres, STAMP attrs."""
    feats = data.features()
    coords_um = (data.table.coords.astype(np.float64) * float(data.table.attrs["slide_mpp"])).astype(np.float32)

    def h5(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            _set_attrs(f.create_dataset("feats", data=feats), provenance_attrs(data))
            f.create_dataset("coords", data=coords_um)
            _set_attrs(f, stamp_attrs(data, encoder))

    return [_atomic_file(out / encoder / f"{data.slide_id}.h5", h5)]


WRITERS: dict[str, Callable[[FeatureStoreData, Path, str], list[Path]]] = {
    "clam": write_clam,
    "trident": write_trident,
    "stamp": write_stamp,
}


def export_features(
    results: str | os.PathLike[str],
    encoder: str,
    fmt: str,
    out: str | os.PathLike[str],
    slide_ids: list[str] | None = None,
) -> ExportResult:
    """Write the feature stores of `encoder` (all complete ones, or `slide_ids`) in `fmt`'s layout under `out`.

    Every store is checked before the first file is written (FeatureError, one line, on an incomplete store or one
    whose coords differ from its tile table); slides with no tiles are skipped with a note, as STAMP and CLAM
    cannot train on an empty bag."""
    if fmt not in WRITERS:
        raise ConfigError(f"export format {fmt!r} is not known; use one of {', '.join(FORMATS)}")
    stores, skipped = select_stores(results, encoder, slide_ids)
    checked = [check_feature_store(s) for s in stores]
    result = ExportResult(skipped=skipped)
    for data in checked:
        if data.n_tiles == 0:
            result.skipped.append(f"{data.slide_id}: skipped, the slide has no tiles (no tissue)")
            continue
        result.written += WRITERS[fmt](data, Path(out), encoder)
    return result
