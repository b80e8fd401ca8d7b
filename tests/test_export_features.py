"""`wsi-pipeline export-features`: real feature stores written out in the layouts of CLAM, TRIDENT and STAMP, and
read back the way each tool's own loader reads them (dataset names, dtypes, attributes; see
wsi_pipeline/report/feature_formats.py for the source files and commits matched)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from wsi_pipeline import __version__
from wsi_pipeline.cli import app
from wsi_pipeline.encode.engine import encode_slide
from wsi_pipeline.encode.store import StoreLayout
from wsi_pipeline.io.atomic import TMP_MARK
from wsi_pipeline.layout import ResultsLayout
from wsi_pipeline.slide.reader import open_slide
from wsi_pipeline.synthetic import write_synthetic_slide
from wsi_pipeline.tiling.stage import tile_slide

sys.path.insert(0, str(Path(__file__).parent))
from test_encode_engine import SMALL_TILES, STAIN, fresh_results, read_store  # noqa: E402

ENC = "stain-texture"
SLIDES = ("synth", "synth2")
SLIDE_MPP = 0.25  # level 0 at 40x, tiles at 0.5 µm/px (20x): tile sizes and coords differ between the two frames
runner = CliRunner()


@pytest.fixture(scope="module")
def encoded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tissue slides and one blank slide, tiled (128 px at 0.5 µm/px from 0.25 µm/px) and encoded."""
    root = tmp_path_factory.mktemp("export")
    results = root / "results"
    for name, seed, regions in (("synth", 1, None), ("synth2", 2, None), ("blank", 3, ())):
        slide = write_synthetic_slide(
            root / f"{name}.svs",
            width=4096,
            height=3072,
            mpp=SLIDE_MPP,
            seed=seed,
            regions=regions,
            level_downsamples=(1.0, 2.0, 8.0),  # level 1 is at the tiles' 0.5 µm/px: read there
        ).path
        assert tile_slide(slide, results, tiling=SMALL_TILES)["status"] in ("ok", "no tissue")
        side = encode_slide(results, name, STAIN, device="cpu", layout=StoreLayout(16, 32))
        assert side["status"] in ("ok", "no tissue"), side
    return results


def export(results: Path, fmt: str, out: Path, *extra: str) -> tuple[int, str]:
    r = runner.invoke(
        app, ["export-features", str(results), "--encoder", ENC, "--format", fmt, "--out", str(out), *extra]
    )
    return r.exit_code, r.output


def store(results: Path, slide: str) -> tuple[np.ndarray, np.ndarray, dict]:
    return read_store(ResultsLayout(results).feature_store(ENC, slide))


def no_temporaries(out: Path) -> bool:
    return not [p for p in out.rglob("*") if TMP_MARK in p.name]


def test_clam_layout_reads_back_as_generic_mil_dataset(encoded: Path, tmp_path: Path) -> None:
    out = tmp_path / "clam"
    code, output = export(encoded, "clam", out)
    assert code == 0, output
    assert "blank: skipped" in output and "no tiles" in output
    assert sorted(p.name for p in (out / "pt_files").iterdir()) == ["synth.pt", "synth2.pt"]
    for slide in SLIDES:
        feats, coords, attrs = store(encoded, slide)
        # Generic_MIL_Dataset.__getitem__, default: torch.load(data_dir/pt_files/{slide_id}.pt)
        bag = torch.load(out / "pt_files" / f"{slide}.pt")
        assert isinstance(bag, torch.Tensor) and bag.dtype == torch.float32 and bag.shape == feats.shape
        np.testing.assert_array_equal(bag.numpy(), feats.astype(np.float32))
        # ... and after load_from_h5(True): h5_files/{slide_id}.h5 ['features'][:], ['coords'][:]
        with h5py.File(out / "h5_files" / f"{slide}.h5", "r") as f:
            h5_feats, h5_coords = f["features"][:], f["coords"][:]
            assert h5_feats.dtype == np.float32 and h5_coords.dtype == np.int32  # as extract_features_fp.py writes
            np.testing.assert_array_equal(h5_feats, feats.astype(np.float32))
            np.testing.assert_array_equal(h5_coords, coords)
            c = dict(f["coords"].attrs)  # CLAM's patching attrs (Whole_Slide_Bag_FP reads patch_level, patch_size)
            assert c["patch_level"] == 1 and c["patch_size"] == 128 and c["name"] == slide  # 128 px at level 1
            assert list(c["downsample"]) == [2.0, 2.0]
            with open_slide(encoded.parent / f"{slide}.svs") as wsi:  # CLAM: level_dim = the size of patch_level
                assert list(c["level_dim"]) == list(c["downsampled_level_dim"]) == list(wsi.info.level_dimensions[1])
            p = dict(f["features"].attrs)
            assert p["encoder"] == ENC == attrs["encoder"] and p["source_dtype"] == "float16"
            assert p["slide_mpp"] == SLIDE_MPP and p["target_mpp"] == 0.5 and p["tile_px"] == 128
            assert p["exported_by"] == f"wsi_pipeline {__version__}" and p["package_version"] == __version__
            assert p["weights_sha256"] == "" and p["embed_dim"] == 50
    assert no_temporaries(out)


def test_trident_layout_reads_back_as_trident_features(encoded: Path, tmp_path: Path) -> None:
    out = tmp_path / "trident"
    code, output = export(encoded, "trident", out)
    assert code == 0, output
    folder = out / f"features_{ENC}"
    assert sorted(p.name for p in folder.iterdir()) == ["synth.h5", "synth2.h5"]
    for slide in SLIDES:
        feats, coords, _ = store(encoded, slide)
        # WSI.extract_slide_features: f['coords'][:], f['features'][:], dict(f['coords'].attrs) (= IO.read_coords)
        with h5py.File(folder / f"{slide}.h5", "r") as f:
            h5_coords, h5_feats, c = f["coords"][:], f["features"][:], dict(f["coords"].attrs)
            fa = dict(f["features"].attrs)
        assert h5_feats.dtype == np.float32 and h5_feats.shape == feats.shape
        np.testing.assert_array_equal(h5_feats, feats.astype(np.float32))
        assert h5_coords.dtype == np.int64
        np.testing.assert_array_equal(h5_coords, coords)
        # IO.coords_to_h5: patch_size at the target magnification, magnification = 10 / µm per px
        assert c["patch_size"] == 128 and c["patch_size_level0"] == 256
        assert c["level0_magnification"] == 40.0 and c["target_magnification"] == 20.0
        assert c["overlap"] == 0 and c["name"] == slide
        assert (c["level0_width"], c["level0_height"]) == (4096, 3072)
        # WSIPatcher: patch_size_src = round(patch_size * (10/target_mag) / (10/level0_mag)) reads our tiles
        assert round(c["patch_size"] * c["level0_magnification"] / c["target_magnification"]) == 256
        assert fa["encoder"] == ENC and fa["name"] == slide and fa["savetodir"] == str(folder.resolve())
        assert fa["revision"] == "" and fa["tile_size_level0"] == 256.0
    assert no_temporaries(out)


def test_stamp_layout_reads_back_as_stamp_features(encoded: Path, tmp_path: Path) -> None:
    out = tmp_path / "stamp"
    code, output = export(encoded, "stamp", out)
    assert code == 0, output
    feature_dir = out / ENC  # STAMP's `{output_dir}/{extractor}`, what its feature_dir setting points at
    # stamp.modeling.data.detect_feature_type: the feat_type of every .h5 under feature_dir, all "tile"
    types = set()
    for file in feature_dir.rglob("*.h5"):
        with h5py.File(file, "r") as h5:
            assert h5.attrs.get("feat_type") is not None or h5.attrs.get("encoder") is None
            types.add(str(h5.attrs.get("feat_type")))
    assert types == {"tile"}
    for slide in SLIDES:
        feats, coords, _ = store(encoded, slide)
        with h5py.File(feature_dir / f"{slide}.h5", "r") as h5:
            # BagDataset.__getitem__: torch.from_numpy(h5["feats"][()]) ... .float()
            bag = torch.from_numpy(h5["feats"][()]).float()
            # get_coords: "tile_size_um" set -> coords are micrometres; tile_size_px gives the MPP
            tile_size_um = float(h5.attrs["tile_size_um"])
            coords_um = h5["coords"][:]
            tile_size_px = int(h5.attrs["tile_size_px"])
            assert h5.attrs["unit"] == "um" and h5.attrs["extractor"] == ENC
            assert "stamp_version" not in h5.attrs  # a version newer than the reader's STAMP would be refused
            assert h5["feats"].dtype == np.float16  # the store's dtype, as STAMP's extractor writes
            assert h5["feats"].attrs["encoder"] == ENC and h5["feats"].attrs["slide_mpp"] == SLIDE_MPP
        assert bag.shape == feats.shape
        np.testing.assert_array_equal(bag.numpy(), feats.astype(np.float32))
        assert coords_um.dtype == np.float32
        np.testing.assert_array_equal(coords_um, (coords * SLIDE_MPP).astype(np.float32))
        assert tile_size_um == 64.0 and tile_size_px == 128 and tile_size_um / tile_size_px == 0.5  # CoordsInfo.mpp
    assert no_temporaries(out)


def test_slide_selection_and_one_line_errors(encoded: Path, tmp_path: Path) -> None:
    out = tmp_path / "one"
    code, output = export(encoded, "stamp", out, "--slide-id", "synth2")
    assert code == 0, output
    assert [p.name for p in (out / ENC).iterdir()] == ["synth2.h5"]

    code, output = export(encoded, "clam", tmp_path / "x", "--slide-id", "synth", "--slide-id", "nope")
    assert code == 1 and "nope" in output and str(ResultsLayout(encoded).feature_dir(ENC)) in output
    assert not (tmp_path / "x").exists()

    code, output = export(encoded, "parquet", tmp_path / "x")
    assert code == 1 and "clam, trident, stamp" in output and len(output.strip().splitlines()) == 1


def test_encoder_folder_without_stores_names_the_folder(encoded: Path, tmp_path: Path) -> None:
    empty = ResultsLayout(tmp_path / "results").feature_dir(ENC)
    empty.mkdir(parents=True)
    code, output = export(tmp_path / "results", "trident", tmp_path / "out")
    assert code == 1
    assert output.strip() == f"error: {empty}: no feature stores found; run `wsi-pipeline encode` first"
    code, output = export(tmp_path / "nowhere", "clam", tmp_path / "out")
    assert code == 1 and str(ResultsLayout(tmp_path / "nowhere").feature_dir(ENC)) in output
    assert not (tmp_path / "out").exists()


def copy_results(encoded: Path, dst: Path) -> Path:
    results = fresh_results(encoded, dst)
    shutil.copytree(ResultsLayout(encoded).feature_dir(ENC), ResultsLayout(results).feature_dir(ENC))
    return results


def test_incomplete_and_stale_stores_are_refused(encoded: Path, tmp_path: Path) -> None:
    results = copy_results(encoded, tmp_path / "results")
    layout = ResultsLayout(results)
    g = zarr.open_group(str(layout.feature_store(ENC, "synth")), mode="r+")
    g.attrs["complete"] = False  # what a store left by an older, interrupted writer looks like
    code, output = export(results, "clam", tmp_path / "a", "--slide-id", "synth")
    assert code == 1 and "not a complete feature store" in output and len(output.strip().splitlines()) == 1
    code, output = export(results, "clam", tmp_path / "b")  # all stores: the incomplete one is named and left out
    assert code == 0, output
    assert "synth: skipped, not a complete feature store" in output
    assert sorted(p.name for p in (tmp_path / "b" / "pt_files").iterdir()) == ["synth2.pt"]

    g.attrs["complete"] = True
    coords = g["coords"]
    assert isinstance(coords, zarr.Array)
    coords[0, 0] = int(coords[0, 0]) + 1  # features of another tile grid than the tile table's
    code, output = export(results, "trident", tmp_path / "c")
    assert code == 1 and "coords differ from the tile table" in output and len(output.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()  # every store is checked before the first file is written


def test_unwritten_feature_rows_are_refused(encoded: Path, tmp_path: Path) -> None:
    results = copy_results(encoded, tmp_path / "results")
    feats = zarr.open_group(str(ResultsLayout(results).feature_store(ENC, "synth2")), mode="r+")["features"]
    assert isinstance(feats, zarr.Array)
    feats[3] = np.nan  # how a row reads when its shard file was lost in a copy
    code, output = export(results, "stamp", tmp_path / "out", "--slide-id", "synth2")
    assert code == 1 and "1 feature rows are not finite" in output and len(output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
