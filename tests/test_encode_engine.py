"""Stage 2 engine on real slides and real Zarr stores: fidelity to a PIL/OpenSlide reference, streaming writes,
empty/skipped/failed slides (truncated TIFF, NaN embeddings), OOM back-off, reuse, cohort opener, HDF5, CLI."""

from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import h5py
import numpy as np
import openslide
import pytest
import torch
import zarr
from PIL import Image
from tiny_models import make_tiny_timm
from typer.testing import CliRunner

from wsi_pipeline import __version__
from wsi_pipeline.encode import store as features
from wsi_pipeline.encode.cohort import open_cohort
from wsi_pipeline.encode.engine import encode_slide
from wsi_pipeline.encode.loader import SlideSource, TileBatchDataset, make_loader
from wsi_pipeline.encode.store import StoreLayout, plan_layout
from wsi_pipeline.encoders import EncoderConfig, build_encoder, reference_preprocess_pil, register_encoder
from wsi_pipeline.encoders.base import ModelSource, Preprocessing, TorchTileEncoder
from wsi_pipeline.encoders.stain_texture import StainTextureEncoder
from wsi_pipeline.errors import FeatureError
from wsi_pipeline.io.atomic import TMP_MARK
from wsi_pipeline.layout import STATUS_FAILED, STATUS_NO_TISSUE, STATUS_OK, STATUS_SKIPPED, ResultsLayout
from wsi_pipeline.report.export import export_features_h5
from wsi_pipeline.synthetic import write_synthetic_slide
from wsi_pipeline.tiling.config import TilingParams
from wsi_pipeline.tiling.geometry import geometry_from_attrs, read_tile
from wsi_pipeline.tiling.stage import tile_slide
from wsi_pipeline.tiling.table import read_tile_table

STAIN = EncoderConfig(name="stain-texture")
SMALL_TILES = TilingParams(tile_px=128, target_mpp=0.5)


# --- shared helpers (imported by the other test_encode_* modules) ---------------------------------------------


def tiled_synthetic(
    root: Path, name: str, width: int = 2048, height: int = 2048, seed: int = 1, **kwargs: object
) -> Path:
    """A synthetic SVS tiled by stage 1 (128 px tiles at 0.5 µm/px) into `root/results`; returns the results dir."""
    slide = write_synthetic_slide(root / f"{name}.svs", width=width, height=height, mpp=0.5, seed=seed, **kwargs).path  # type: ignore[arg-type]
    results = root / "results"
    side = tile_slide(slide, results, tiling=SMALL_TILES)
    assert side["status"] in ("ok", "no tissue"), side
    return results


def fresh_results(src: Path, dst: Path) -> Path:
    """A new results folder holding a copy of `src`'s tile stores (they point at the slides by absolute path)."""
    shutil.copytree(src / "tiles", dst / "tiles")
    return dst


def read_store(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    g = zarr.open_group(str(path), mode="r")
    return np.asarray(g["features"][...]), np.asarray(g["coords"][...]), dict(g.attrs)


def temporaries(results: Path) -> list[Path]:
    return [p for p in (results / "features").rglob(f"*{TMP_MARK}*")] if (results / "features").exists() else []


def write_ifds_first_tiff(path: Path, levels: list[np.ndarray], mpp: float, tile: int = 256) -> None:
    """A classic tiled TIFF (deflate RGB) with every IFD before any pixel data and level 0's tiles last, so
    truncating the file leaves it openable while level-0 tiles go missing (an interrupted copy of such a file)."""
    n_tags, tiles = 15, []
    for a in levels:
        h, w = a.shape[:2]
        ty, tx = -(-h // tile), -(-w // tile)
        pad = np.full((ty * tile, tx * tile, 3), 255, np.uint8)
        pad[:h, :w] = a
        tiles.append(
            [
                zlib.compress(pad[y * tile : (y + 1) * tile, x * tile : (x + 1) * tile].tobytes(), 6)
                for y in range(ty)
                for x in range(tx)
            ]
        )
    ifd_size = 2 + 12 * n_tags + 4
    pos = 8 + ifd_size * len(levels)
    arrays = []
    for t in tiles:  # BitsPerSample (6 B), X/Y resolution (8 B each), offsets, byte counts
        arrays.append(pos)
        pos += 22 + 8 * len(t)
    offsets: list[list[int]] = [[] for _ in tiles]
    for i in reversed(range(len(tiles))):  # coarsest level's pixels first
        for b in tiles[i]:
            offsets[i].append(pos)
            pos += len(b)

    def entry(tag: int, typ: int, count: int, value: int) -> bytes:
        if typ == 3 and count == 1:
            return struct.pack("<HHIHH", tag, typ, count, value, 0)
        return struct.pack("<HHII", tag, typ, count, value)

    out = bytearray(b"II*\x00" + struct.pack("<I", 8))
    for i, (a, t, at) in enumerate(zip(levels, tiles, arrays, strict=True)):
        h, w = a.shape[:2]
        ents = [
            entry(254, 4, 1, int(i > 0)),
            entry(256, 4, 1, w),
            entry(257, 4, 1, h),
            entry(258, 3, 3, at),
            entry(259, 3, 1, 8),
            entry(262, 3, 1, 2),
            entry(277, 3, 1, 3),
            entry(282, 5, 1, at + 6),
            entry(283, 5, 1, at + 14),
            entry(284, 3, 1, 1),
            entry(296, 3, 1, 3),
            entry(322, 4, 1, tile),
            entry(323, 4, 1, tile),
            entry(324, 4, len(t), at + 22),
            entry(325, 4, len(t), at + 22 + 4 * len(t)),
        ]
        nxt = 8 + ifd_size * (i + 1) if i + 1 < len(levels) else 0
        out += struct.pack("<H", n_tags) + b"".join(ents) + struct.pack("<I", nxt)
    for a, t, offs in zip(levels, tiles, offsets, strict=True):
        res = round(1e4 / (mpp * levels[0].shape[1] / a.shape[1]))  # pixels per cm
        out += struct.pack("<3H", 8, 8, 8) + struct.pack("<II", res, 1) * 2
        out += struct.pack(f"<{len(t)}I", *offs) + struct.pack(f"<{len(t)}I", *(len(b) for b in t))
    for t in reversed(tiles):
        out += b"".join(t)
    path.write_bytes(bytes(out))


# --- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiled_synthetic(tmp_path_factory.mktemp("synth"), "synth")


@pytest.fixture(scope="module")
def tiny_timm(tmp_path_factory: pytest.TempPathFactory) -> EncoderConfig:
    return EncoderConfig(name="timm", path=str(make_tiny_timm(tmp_path_factory.mktemp("timm"))))


@pytest.fixture(scope="module")
def cmu_results(cmu_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    results = tmp_path_factory.mktemp("cmu") / "results"
    assert tile_slide(cmu_slide, results)["status"] == "ok"
    return results


# --- fidelity ---------------------------------------------------------------------------------------------------


def test_fidelity_against_openslide_pil_reference(
    cmu_slide: Path, cmu_results: Path, tiny_timm: EncoderConfig, tmp_path: Path
) -> None:
    """Engine features (worker-read tiles, cv2 + on-device resize) match PIL crops of OpenSlide's read_region with
    a PIL bicubic resize, through the same random-weight model; same order as the tile table."""
    results = fresh_results(cmu_results, tmp_path / "r")
    side = encode_slide(
        results, "cmu-1-small-region", tiny_timm, batch_size=8, num_workers=2, device="cpu", dtype="float32"
    )
    assert side["status"] == STATUS_OK and side["n_tiles"] > 20, side
    feats, coords, attrs = read_store(ResultsLayout(results).feature_store("timm", "cmu-1-small-region"))
    table = read_tile_table(results / "tiles" / "cmu-1-small-region.zarr")
    np.testing.assert_array_equal(coords, table.coords)
    assert feats.shape == (len(table), 48) and feats.dtype == np.float32

    geom = geometry_from_attrs(table.attrs)
    osr = openslide.OpenSlide(str(cmu_slide))
    region = osr.read_region((0, 0), geom.read_level, osr.level_dimensions[geom.read_level]).convert("RGB")
    ds = geom.level_downsample
    crops = [
        region.crop((round(x / ds), round(y / ds), round(x / ds) + geom.read_size, round(y / ds) + geom.read_size))
        for x, y in table.coords
    ]
    enc = build_encoder(tiny_timm, "cpu")
    ref = enc.encode_pixels(reference_preprocess_pil(crops, enc.preprocessing)).numpy()
    cos = (feats * ref).sum(1) / np.linalg.norm(feats, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.999, cos.min()
    # Provenance recorded with the store.
    assert attrs["encoder"] == "timm" and attrs["weights_sha256"] and attrs["package_version"] == __version__
    assert attrs["preprocessing"]["size"] == 64 and attrs["dtype"] == "float32" and attrs["complete"] is True
    assert attrs["tile_geometry"]["read_size"] == geom.read_size and attrs["created"]

    # float16 (the default) is the float32 result rounded, with one reader in-process instead of two workers.
    results16 = fresh_results(cmu_results, tmp_path / "r16")
    encode_slide(results16, "cmu-1-small-region", tiny_timm, batch_size=5, num_workers=0, device="cpu")
    f16, _, a16 = read_store(ResultsLayout(results16).feature_store("timm", "cmu-1-small-region"))
    assert f16.dtype == np.float16 and a16["dtype"] == "float16"
    np.testing.assert_array_equal(f16, feats.astype(np.float16))


def test_loader_yields_read_tile_batches_and_opens_slides_in_workers(synth: Path) -> None:
    table = read_tile_table(synth / "tiles" / "synth.zarr")
    geom = geometry_from_attrs(table.attrs)
    source = SlideSource.from_tile_attrs(table.attrs)
    ds = TileBatchDataset(source, geom, table.coords, batch_size=7)
    batches = list(make_loader(ds, num_workers=2, device="cpu", prefetch_factor=2))
    assert ds._slide is None  # the parent never opened a handle: each worker opened its own
    assert [b[1] for b in batches] == list(range(0, len(table), 7))
    assert all(b[0].dtype == torch.uint8 and b[2] == "" for b in batches)
    tiles = torch.cat([b[0] for b in batches]).numpy()
    with source.open() as slide:
        expected = np.stack([read_tile(slide, tuple(xy), geom) for xy in table.coords])
    np.testing.assert_array_equal(tiles, expected)
    assert not make_loader(ds, device="cpu").pin_memory  # pinned only for CUDA


# --- storage: layout, streaming writes, reuse -------------------------------------------------------------------


def test_plan_layout_many_rows_per_chunk_few_shards() -> None:
    big = plan_layout(100_000, 1152, "float16")  # a large ConceptCLIP slide
    assert big.chunk_rows >= 128 and big.shard_rows % big.chunk_rows == 0
    assert -(-100_000 // big.shard_rows) <= 16  # a handful of shard files
    small = plan_layout(51, 50, "float16")
    assert small.shard_rows == small.chunk_rows >= 51  # one chunk, one shard
    assert plan_layout(0, 50).chunk_rows >= 16
    with pytest.raises(ValueError):
        StoreLayout(16, 24)


def test_writer_streams_whole_shards_and_never_holds_more(
    synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writers: list[features.ShardWriter] = []
    real_init = features.ShardWriter.__init__

    def spy(self: features.ShardWriter, *args: object, **kwargs: object) -> None:
        real_init(self, *args, **kwargs)  # type: ignore[arg-type]
        writers.append(self)

    monkeypatch.setattr(features.ShardWriter, "__init__", spy)
    results = fresh_results(synth, tmp_path)
    side = encode_slide(results, "synth", STAIN, batch_size=5, device="cpu", layout=StoreLayout(8, 16))
    assert side["status"] == STATUS_OK
    n = side["n_tiles"]
    feat_writer = next(w for w in writers if w.array.shape[1] == 50)
    assert n > 32 and feat_writer.peak_rows <= 16 and feat_writer.flushes == -(-n // 16)
    store = ResultsLayout(results).feature_store("stain-texture", "synth")
    arr = zarr.open_array(str(store / "features"), mode="r")
    assert arr.chunks == (8, 50) and arr.shards == (16, 50)
    assert len(list((store / "features" / "c").rglob("*"))) - len(list((store / "features" / "c").glob("*"))) == -(
        -n // 16
    )  # one file per shard
    # Same numbers as the encoder applied directly to read_tile output.
    table = read_tile_table(results / "tiles" / "synth.zarr")
    with SlideSource.from_tile_attrs(table.attrs).open() as slide:
        tiles = np.stack([read_tile(slide, tuple(xy), geometry_from_attrs(table.attrs)) for xy in table.coords])
    direct = StainTextureEncoder(STAIN).encode_uint8(torch.from_numpy(tiles)).numpy()
    np.testing.assert_array_equal(np.asarray(arr[...]), direct.astype(np.float16))


def test_shard_writer_unit(tmp_path: Path) -> None:
    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=3)
    arr, _ = features.create_feature_arrays(g, 45, 3, "float32", StoreLayout(4, 8))
    rows = np.random.default_rng(0).normal(size=(45, 3)).astype(np.float32)
    w = features.ShardWriter(arr)
    for a, b in [(0, 3), (3, 20), (20, 21), (21, 45)]:
        w.append(rows[a:b])
    w.close()
    np.testing.assert_array_equal(arr[...], rows)
    assert w.peak_rows == 8 and w.flushes == 6
    # A shard file lost after writing (an interrupted copy) reads as NaN rows, never as plausible zeros.
    (tmp_path / "g.zarr" / "features" / "c" / "1" / "0").unlink()
    again = np.asarray(zarr.open_array(str(tmp_path / "g.zarr" / "features"), mode="r")[...])
    assert np.isnan(again[8:16]).all() and np.array_equal(again[16:], rows[16:])
    with pytest.raises(ValueError):
        features.ShardWriter(arr, start=4)


def test_rerun_reuses_complete_store_and_redoes_incomplete(synth: Path, tmp_path: Path) -> None:
    builds = []

    def counting(cfg: EncoderConfig, device: torch.device) -> StainTextureEncoder:
        builds.append(device)
        return StainTextureEncoder(cfg, device)

    register_encoder("counted-stain", counting)
    cfg = EncoderConfig(name="counted-stain")
    results = fresh_results(synth, tmp_path)
    first = encode_slide(results, "synth", cfg, device="cpu")
    store = ResultsLayout(results).feature_store("counted-stain", "synth")
    before = (store / "zarr.json").stat().st_mtime_ns
    again = encode_slide(results, "synth", cfg, device="cpu")
    assert again["reused"] and again["status"] == STATUS_OK and len(builds) == 1  # no model load for a reuse
    assert (store / "zarr.json").stat().st_mtime_ns == before
    # A leftover temporary of a killed run is removed; a changed dtype makes the store stale.
    stale = store.with_name(store.name + TMP_MARK + "999-dead")
    (stale / "features").mkdir(parents=True)
    redo = encode_slide(results, "synth", cfg, device="cpu", dtype="float32")
    assert not redo["reused"] and len(builds) == 2 and not stale.exists()
    f32, c32, _ = read_store(store)
    assert f32.dtype == np.float32 and first["n_tiles"] == len(c32)
    assert encode_slide(results, "synth", cfg, device="cpu", dtype="float32", force=True)["reused"] is False
    assert temporaries(results) == []


def test_no_tissue_gives_empty_store_and_stage1_failure_is_skipped(tmp_path: Path, shared_data: Path) -> None:
    results = tiled_synthetic(tmp_path, "blank", width=1024, height=1024, regions=())
    side = encode_slide(results, "blank", STAIN, device="cpu")
    assert side["status"] == STATUS_NO_TISSUE and "no tissue" in side["reason"]  # stage 1's word for it
    feats, coords, attrs = read_store(ResultsLayout(results).feature_store("stain-texture", "blank"))
    assert feats.shape == (0, 50) and coords.shape == (0, 2) and attrs["complete"] is True

    tile_slide(shared_data / "slides" / "broken.svs", results)
    side = encode_slide(results, "broken", STAIN, device="cpu")
    assert side["status"] == STATUS_SKIPPED and side["reason"].startswith("stage 1 failed")
    assert not ResultsLayout(results).feature_store("stain-texture", "broken").exists()
    never = encode_slide(results, "never-tiled", STAIN, device="cpu")
    assert never["status"] == STATUS_SKIPPED and "wsi-pipeline tile" in never["reason"]
    assert ResultsLayout(results).feature_sidecar("stain-texture", "never-tiled").is_file()


# --- bad input: decode failures, non-finite embeddings, OOM back-off ---------------------------------------------


def test_truncated_slide_fails_midway_no_store_no_white_fill(tmp_path: Path) -> None:
    import tifffile

    src = write_synthetic_slide(tmp_path / "src.tiff", width=2048, height=2048, mpp=0.5, fmt="tiff", seed=3)
    l0 = tifffile.TiffFile(src.path).pages[0].asarray()
    l1 = np.asarray(Image.fromarray(l0).resize((512, 512), Image.BOX))
    full = tmp_path / "ifds_first.tiff"
    write_ifds_first_tiff(full, [l0, l1], mpp=0.5)
    cut = tmp_path / "cut.tiff"
    cut.write_bytes(full.read_bytes()[: int(full.stat().st_size * 0.6)])
    # The backend itself raises on the missing tiles and reads the intact ones (no silent white tiles).
    osr = openslide.OpenSlide(str(cut))
    assert np.asarray(osr.read_region((0, 0), 0, (256, 256)))[..., :3].std() > 0
    with pytest.raises(openslide.OpenSlideError):
        osr.read_region((1792, 1792), 0, (256, 256))
    osr.close()

    results = tmp_path / "results"
    assert tile_slide(cut, results, tiling=SMALL_TILES)["status"] == "ok"  # the mask reads the intact level 1
    side = encode_slide(results, "cut", STAIN, batch_size=4, device="cpu", layout=StoreLayout(4, 8))
    assert side["status"] == STATUS_FAILED and str(cut) in side["reason"] and "cannot read" in side["reason"]
    assert "\n" not in side["reason"]
    assert not ResultsLayout(results).feature_store("stain-texture", "cut").exists() and temporaries(results) == []
    assert ResultsLayout(results).feature_sidecar("stain-texture", "cut").is_file()


class _NanAfter(torch.nn.Module):
    """Mean colour -> 4 features; tiles darker than `threshold` give log(negative) = NaN."""

    def __init__(self, threshold: float, scale: float = 1.0) -> None:
        super().__init__()
        self.threshold, self.scale = threshold, scale
        self.proj = torch.nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(2, 3))
        return self.proj(m) * self.scale + torch.log(m.mean(1, keepdim=True) - self.threshold)


def _register_module_encoder(name: str, module: torch.nn.Module) -> None:
    def build(cfg: EncoderConfig, device: torch.device) -> TorchTileEncoder:
        torch.manual_seed(0)
        return TorchTileEncoder(
            cfg.name, module, module, 4, Preprocessing(size=32), ModelSource(random_weights=True), cfg, device
        )

    register_encoder(name, build)


def test_non_finite_embeddings_fail_the_slide(synth: Path, tmp_path: Path) -> None:
    table = read_tile_table(synth / "tiles" / "synth.zarr")
    with SlideSource.from_tile_attrs(table.attrs).open() as slide:
        means = [
            read_tile(slide, tuple(xy), geometry_from_attrs(table.attrs)).mean() / 127.5 - 1 for xy in table.coords
        ]
    _register_module_encoder("test-nan", _NanAfter(threshold=float(np.median(means))))  # about half NaN
    results = fresh_results(synth, tmp_path)
    side = encode_slide(
        results, "synth", EncoderConfig(name="test-nan"), batch_size=8, device="cpu", layout=StoreLayout(8, 8)
    )
    assert side["status"] == STATUS_FAILED and "NaN" in side["reason"] and "synth" in side["reason"]
    assert not ResultsLayout(results).feature_store("test-nan", "synth").exists() and temporaries(results) == []

    _register_module_encoder("test-huge", _NanAfter(threshold=-10.0, scale=1e6))  # finite, beyond float16
    side = encode_slide(results, "synth", EncoderConfig(name="test-huge"), device="cpu")
    assert side["status"] == STATUS_FAILED and "float16" in side["reason"]
    assert (
        encode_slide(results, "synth", EncoderConfig(name="test-huge"), device="cpu", dtype="float32")["status"]
        == STATUS_OK
    )


def test_oom_backoff_halves_the_batch_and_records_it(synth: Path, tmp_path: Path) -> None:
    class Fussy(StainTextureEncoder):
        def encode_uint8(self, tiles: torch.Tensor) -> torch.Tensor:
            if len(tiles) > 4:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return super().encode_uint8(tiles)

    register_encoder("test-fussy", lambda cfg, device: Fussy(cfg, device))
    results = fresh_results(synth, tmp_path)
    side = encode_slide(results, "synth", EncoderConfig(name="test-fussy"), batch_size=16, device="cpu")
    assert side["status"] == STATUS_OK and side["batch_size"] == 16 and side["batch_size_final"] == 4
    got, _, attrs = read_store(ResultsLayout(results).feature_store("test-fussy", "synth"))
    assert attrs["batch_size_final"] == 4
    plain = fresh_results(synth, tmp_path / "plain")
    encode_slide(plain, "synth", STAIN, batch_size=16, device="cpu")
    np.testing.assert_array_equal(got, read_store(ResultsLayout(plain).feature_store("stain-texture", "synth"))[0])


# --- readers: cohort opener, HDF5 export, CLI -------------------------------------------------------------------


def test_cohort_opener_and_h5_export(synth: Path, tmp_path: Path) -> None:
    results = fresh_results(synth, tmp_path)
    encode_slide(results, "synth", STAIN, device="cpu", layout=StoreLayout(16, 32))
    root = ResultsLayout(results).feature_dir("stain-texture")
    (root / f"half.zarr{TMP_MARK}1-abc").mkdir()  # a temporary of a running writer is not a slide
    cohort = open_cohort(results, "stain-texture")
    assert list(cohort) == ["synth"] and cohort.embed_dim == 50
    bag = cohort.bag("synth")
    feats, coords, _ = read_store(root / "synth.zarr")
    np.testing.assert_array_equal(cohort.dask("synth").compute(), feats)
    np.testing.assert_array_equal(bag[10:20], feats[10:20])
    np.testing.assert_array_equal(cohort.coords("synth"), coords)
    assert cohort.attrs["synth"]["encoder"] == "stain-texture"
    with pytest.raises(FeatureError, match="wsi-pipeline encode"):
        open_cohort(results, "stain-texture", ["synth", "missing"])

    out = export_features_h5(root / "synth.zarr", tmp_path / "h5" / "synth.h5")
    with h5py.File(out, "r") as f:
        np.testing.assert_array_equal(f["features"][...], feats)
        np.testing.assert_array_equal(f["coords"][...], coords)
        assert f["coords"].attrs["patch_size_level0"] == 128 and f["features"].attrs["encoder"] == "stain-texture"


def test_encode_command(synth: Path, tmp_path: Path) -> None:
    from wsi_pipeline.cli import app

    results = fresh_results(synth, tmp_path)
    slide_file = Path(read_tile_table(results / "tiles" / "synth.zarr").attrs["slide_path"])
    cfg = tmp_path / "config.yaml"
    cfg.write_text("encoder:\n  name: stain-texture\nencode:\n  batch_size: 8\n  num_workers: 0\n")
    r = CliRunner().invoke(
        app, ["encode", str(slide_file), "--out", str(results), "--config", str(cfg), "--device", "cpu"]
    )
    assert r.exit_code == 0, r.output
    assert "synth: ok" in r.output and ResultsLayout(results).feature_store("stain-texture", "synth").is_dir()
    r = CliRunner().invoke(
        app, ["encode", "synth", "--out", str(results), "--encoder", "stain-texture", "--device", "cpu"]
    )
    assert r.exit_code == 0 and "existing store kept" in r.output
    r = CliRunner().invoke(app, ["encode", "synth", "--out", str(results), "--encoder", "nope", "--device", "cpu"])
    assert r.exit_code == 1 and "unknown encoder" in r.output
