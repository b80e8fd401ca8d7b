"""Stage 2 for one slide or a cohort: tile table -> encoder -> `RESULTS/features/{encoder}/{slide_id}.zarr`.

A slide is encoded under an exclusive lock on `features/{encoder}/.locks/{slide_id}.lock` into a temporary store
that is renamed into place when complete, so concurrent runs never mix chunks and a killed run leaves only a
temporary (removed, under the lock, by the next run, which redoes the slide from scratch). The sidecar
`features/{encoder}/{slide_id}.json` is written always: status ok, skipped (stage 1 failed or found no tissue) or
failed, with the reason, time and tiles/s. Cohorts over several devices (`encode_slides`, bin-packed, slides
split into row ranges) and GPU picking (`acquire_gpu`) live in `sharding.py` and are re-exported here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import typer
import zarr
from pydantic import BaseModel, ConfigDict, Field

from . import __version__
from .encoders import EncoderConfig, TileEncoder, build_encoder
from .errors import PipelineError
from .features import (
    ShardWriter,
    StoreLayout,
    create_feature_arrays,
    feature_dir,
    feature_sidecar_path,
    feature_store_path,
    file_lock,
    is_complete_store,
    plan_layout,
    tiles_signature,
)
from .loader import SlideSource, TileBatchDataset, encode_rows, geometry_from_attrs
from .store import TileTable, atomic_group, jsonable, read_tile_table, remove_stale_temporaries
from .store import write_json_atomic as _write_json

log = logging.getLogger(__name__)

STATUS_OK, STATUS_SKIPPED, STATUS_FAILED = "ok", "skipped", "failed"


class EncodeParams(BaseModel):
    """The `encode:` config section: how tiles are batched, where they run, how features are stored."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(64, ge=1, le=8192, description="tiles per batch (halved automatically on CUDA OOM)")
    num_workers: int = Field(4, ge=0, le=64, description="tile-reading processes per device (0: read inline)")
    prefetch_factor: int = Field(2, ge=1, le=16, description="batches each reader keeps ready")
    device: str = Field("auto", description="auto (cuda if available), cpu, cuda, or cuda:N")
    dtype: Literal["float16", "float32"] = Field("float16", description="stored feature dtype")
    split_threshold: int | None = Field(None, ge=1, description="split slides with more tiles than this across "
                                        "devices (default: the per-device fair share)")
    jobs: int = Field(1, ge=1, le=10000, description="workflow jobs the cohort is split into (by tile count); "
                      "on a cluster, one per GPU node")
    gpus_per_job: int = Field(1, ge=1, le=64, description="GPUs each encode job uses (one model load each)")


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class EncodeOptions:
    batch_size: int = 64
    num_workers: int = 0
    dtype: str = "float16"
    prefetch_factor: int = 2
    layout: StoreLayout | None = None  # tests use tiny shards; default plan_layout(n, dim, dtype)


class EncoderHandle:
    """Builds the encoder on first use only, once: one model load per device per run, none for skipped slides."""

    def __init__(self, cfg: EncoderConfig, device: torch.device, encoder: TileEncoder | None = None) -> None:
        self.cfg, self.device, self._enc = cfg, device, encoder
        self.builds, self.load_seconds = 0, 0.0
        self._prov: dict[str, Any] | None = None

    def get(self) -> TileEncoder:
        if self._enc is None:
            t = time.perf_counter()
            self._enc = build_encoder(self.cfg, self.device)
            self.builds += 1
            self.provenance()
            self.load_seconds += time.perf_counter() - t
        return self._enc

    def provenance(self) -> dict[str, Any]:
        if self._prov is None:  # hashing weights and importing libraries for their versions: once per run
            t = time.perf_counter()
            self._prov = jsonable(self.get().provenance())
            self.load_seconds += time.perf_counter() - t if self.builds == 0 else 0.0
        return self._prov


@dataclass
class _Outputs:
    results: Path
    encoder: str
    slide_id: str
    store: Path = field(init=False)
    sidecar: Path = field(init=False)
    lock: Path = field(init=False)
    parts: Path = field(init=False)

    def __post_init__(self) -> None:
        self.store = feature_store_path(self.results, self.encoder, self.slide_id)
        self.sidecar = feature_sidecar_path(self.results, self.encoder, self.slide_id)
        self.lock = feature_dir(self.results, self.encoder) / ".locks" / f"{self.slide_id}.lock"
        self.parts = feature_dir(self.results, self.encoder) / f"{self.slide_id}.parts"


class _Skip(Exception):
    """Stage 1 produced nothing to encode."""


def load_tile_table(results: Path, slide_id: str) -> TileTable:
    """The slide's tile table, or `_Skip` when stage 1 failed or never ran for it."""
    tiles = results / "tiles"
    side = tiles / f"{slide_id}.json"
    if side.is_file():
        meta = json.loads(side.read_text())
        if meta.get("status") == "failed":
            raise _Skip(f"stage 1 failed: {meta.get('reason', '')}")
    if not (tiles / f"{slide_id}.zarr" / "zarr.json").is_file():
        raise _Skip(f"{tiles / (slide_id + '.zarr')}: no tile store; run `wsi-pipeline tile` for this slide first")
    return read_tile_table(tiles / f"{slide_id}.zarr")


def _expect(cfg: EncoderConfig, dtype: str, tile_attrs: dict[str, Any]) -> dict[str, Any]:
    return {"encoder": cfg.name, "encoder_config": jsonable(cfg.model_dump()), "dtype": dtype,
            "tiles": jsonable(tiles_signature(tile_attrs))}


def _store_attrs(slide_id: str, table: TileTable, cfg: EncoderConfig, handle: EncoderHandle, opts: EncodeOptions,
                 layout: StoreLayout, n_rows: int, results: Path) -> dict[str, Any]:
    prov = handle.provenance()
    tiles = results / "tiles" / f"{slide_id}.zarr"
    return jsonable({
        **_expect(cfg, opts.dtype, table.attrs),
        "slide_id": slide_id, "n_tiles": n_rows, "embed_dim": prov["embed_dim"],
        "revision": prov.get("revision"), "weights_sha256": prov.get("weights_sha256"),
        "preprocessing": prov.get("preprocessing"), "provenance": prov,
        "tile_geometry": geometry_from_attrs(table.attrs).to_dict(), "slide_path": table.attrs.get("slide_path"),
        "tile_store": str(tiles.resolve()), "tile_store_rel": f"../../tiles/{slide_id}.zarr",
        "coords_level": 0, "layout": layout.to_dict(), "batch_size": opts.batch_size,
        "package_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "complete": False,
    })


def _write_store(path: Path, slide_id: str, table: TileTable, start: int, stop: int, cfg: EncoderConfig,
                 handle: EncoderHandle, opts: EncodeOptions, results: Path, extra: dict[str, Any]) -> int:
    """Encode rows [start, stop) of `table` into a new store at `path` (atomic); returns the final batch size."""
    enc = handle.get()
    n = stop - start
    layout = opts.layout or plan_layout(n, enc.embed_dim, opts.dtype)
    source = SlideSource.from_tile_attrs(table.attrs)
    with atomic_group(path) as g:
        feats, coords = create_feature_arrays(g, n, enc.embed_dim, opts.dtype, layout)
        cw = ShardWriter(coords)
        cw.append(table.coords[start:stop])
        cw.close()
        g.attrs.update({**_store_attrs(slide_id, table, cfg, handle, opts, layout, n, results), **extra})
        final_batch = opts.batch_size
        if n:
            source.check_unchanged()
            ds = TileBatchDataset(source, geometry_from_attrs(table.attrs), table.coords, opts.batch_size, start,
                                  stop)
            final_batch = encode_rows(enc, ds, ShardWriter(feats), dtype=opts.dtype, num_workers=opts.num_workers,
                                      prefetch_factor=opts.prefetch_factor, context=f"{slide_id} (encoder {cfg.name})")
        g.attrs.update({"complete": True, "batch_size_final": final_batch})
    return final_batch


def _sidecar_base(results: Path, slide_id: str, cfg: EncoderConfig, device: torch.device,
                  opts: EncodeOptions) -> dict[str, Any]:
    return {"slide_id": slide_id, "encoder": cfg.name, "status": STATUS_FAILED, "reason": "", "n_tiles": 0,
            "device": str(device), "batch_size": opts.batch_size, "num_workers": opts.num_workers,
            "dtype": opts.dtype, "store": None, "reused": False, "package_version": __version__}


def _encode_whole(results: Path, slide_id: str, cfg: EncoderConfig, opts: EncodeOptions, handle: EncoderHandle,
                  force: bool) -> dict[str, Any]:
    out = _Outputs(results, cfg.name, slide_id)
    side = _sidecar_base(results, slide_id, cfg, handle.device, opts)
    started = time.perf_counter()
    with file_lock(out.lock):
        try:
            table = load_tile_table(results, slide_id)
            side["n_tiles"] = len(table)
            if not force and is_complete_store(out.store, _expect(cfg, opts.dtype, table.attrs)):
                return _reuse(out, side)
            remove_stale_temporaries(out.store)
            loads = handle.load_seconds
            final_batch = _write_store(out.store, slide_id, table, 0, len(table), cfg, handle, opts, results, {})
            side.update(status=STATUS_OK if len(table) else STATUS_SKIPPED, store=f"features/{cfg.name}/"
                        f"{slide_id}.zarr", batch_size_final=final_batch,
                        reason="" if len(table) else "stage 1 found no tissue (0 tiles): empty store written",
                        model_load_seconds=round(handle.load_seconds - loads, 3))
        except _Skip as why:
            side.update(status=STATUS_SKIPPED, reason=str(why))
        except PipelineError as err:
            side.update(status=STATUS_FAILED, reason=str(err))
            log.info("%s: failed: %s", slide_id, err)
        _finish(side, time.perf_counter() - started - side.get("model_load_seconds", 0.0), out.sidecar)
    return side


def _finish(side: dict[str, Any], secs: float, sidecar: Path) -> None:
    """Record time (model loading excluded) and throughput, then write the sidecar."""
    side["seconds"] = round(secs, 3)
    side["tiles_per_s"] = round(side["n_tiles"] / secs, 2) if side["status"] == STATUS_OK and secs > 0 else None
    _write_json(sidecar, side)


def _reuse(out: _Outputs, side: dict[str, Any]) -> dict[str, Any]:
    """A complete store exists: keep it (and its sidecar when that says ok)."""
    if out.sidecar.is_file():
        old = json.loads(out.sidecar.read_text())
        if old.get("status") in (STATUS_OK, STATUS_SKIPPED) and old.get("store"):
            return {**old, "reused": True}
    attrs = dict(zarr.open_group(str(out.store), mode="r").attrs)
    n = int(attrs["n_tiles"])
    side.update(status=STATUS_OK if n else STATUS_SKIPPED, store=f"features/{out.encoder}/{out.slide_id}.zarr",
                reason="" if n else "stage 1 found no tissue (0 tiles): empty store written", seconds=0.0,
                tiles_per_s=None, batch_size_final=attrs.get("batch_size_final"))
    _write_json(out.sidecar, side)
    return {**side, "reused": True}


def encode_slide(results: str | Path, slide_id: str, encoder_cfg: EncoderConfig, *, batch_size: int = 64,
                 num_workers: int = 0, device: str | torch.device = "auto", dtype: str = "float16",
                 force: bool = False, prefetch_factor: int = 2, encoder: TileEncoder | None = None,
                 layout: StoreLayout | None = None) -> dict[str, Any]:
    """Encode one slide's tiles into its feature store; never raises for a bad slide (see the returned sidecar).

    Pass a built `encoder` to reuse one model across slides (it must be on `device`)."""
    dev = encoder.device if encoder is not None else resolve_device(device)
    opts = EncodeOptions(batch_size, num_workers, dtype, prefetch_factor, layout)
    return _encode_whole(Path(results), slide_id, encoder_cfg, opts, EncoderHandle(encoder_cfg, dev, encoder), force)




def __getattr__(name: str) -> Any:
    # The cohort runner and GPU picker live in sharding.py (which imports this module): re-exported lazily.
    if name in ("encode_slides", "acquire_gpu"):
        from . import sharding

        return getattr(sharding, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def config_sections(config: str | Path | None) -> tuple[EncoderConfig, EncodeParams]:
    """The `encoder:` and `encode:` sections of a pipeline YAML (defaults when absent or no file)."""
    import yaml

    from .errors import ConfigError

    data: dict[str, Any] = {}
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found; pass --config with a YAML file like "
                              "workflows/config.yaml")
        data = yaml.safe_load(path.read_text()) or {}
    try:
        return EncoderConfig.model_validate(data.get("encoder") or {}), EncodeParams.model_validate(
            data.get("encode") or {})
    except ValueError as err:
        raise ConfigError(f"{config}: encoder/encode section: {' '.join(str(err).split())}") from None


@contextlib.contextmanager
def _gpu_for(results: Path, dev: torch.device) -> Iterator[torch.device]:
    if dev.type != "cuda" or dev.index is not None:
        yield dev
        return
    from .sharding import acquire_gpu

    with acquire_gpu(results) as i:
        yield torch.device("cuda", i)


def encode_command(
    slide: Annotated[str, typer.Argument(help="slide id, or the slide file (id = file name without extension)")],
    out: Annotated[Path, typer.Option("--out", help="results folder holding tiles/; features/ is written inside")],
    encoder: Annotated[str | None, typer.Option("--encoder", help="encoder name (default: config encoder.name)")]
    = None,
    model_path: Annotated[str | None, typer.Option(help="local weights folder/file (encoder.path)")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config (its encoder/encode sections are used)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="tiles per batch (default 64)")] = None,
    num_workers: Annotated[int | None, typer.Option(help="tile-reading worker processes (0: inline)")] = None,
    device: Annotated[str | None, typer.Option(
        help="auto, cpu, cuda:N, or cuda (a free GPU picked by lock file under RESULTS/.gpu_locks)")] = None,
    dtype: Annotated[str | None, typer.Option(help="stored feature dtype: float16 or float32")] = None,
    force: Annotated[bool, typer.Option(help="re-encode even if a complete store exists")] = False,
    record_failures: Annotated[bool, typer.Option(
        help="record a bad slide in its sidecar and exit 0 (what a cohort run does)")] = False,
) -> None:
    """Encode one slide's tiles: RESULTS/tiles/{id}.zarr -> RESULTS/features/{encoder}/{id}.zarr (+ .json)."""
    from .slide import default_slide_id

    try:
        enc_cfg, params = config_sections(config)
        updates = {k: v for k, v in {"name": encoder, "path": model_path}.items() if v is not None}
        enc_cfg = EncoderConfig.model_validate({**enc_cfg.model_dump(), **updates})
        overrides = {"batch_size": batch_size, "num_workers": num_workers, "device": device, "dtype": dtype}
        params = EncodeParams.model_validate({**params.model_dump(),
                                              **{k: v for k, v in overrides.items() if v is not None}})
        slide_id = default_slide_id(slide) if Path(slide).exists() else slide
        dev = resolve_device(params.device)
        # "cuda" without an index: take a free GPU by lock file (Snakemake counts GPUs but does not assign them).
        with _gpu_for(out, dev) as dev:
            result = encode_slide(out, slide_id, enc_cfg, batch_size=params.batch_size,
                                  num_workers=params.num_workers, device=dev, dtype=params.dtype, force=force,
                                  prefetch_factor=params.prefetch_factor)
    except (PipelineError, ValueError) as err:
        typer.echo(f"error: {' '.join(str(err).split())}", err=True)
        raise typer.Exit(code=1) from None
    if result["status"] == STATUS_FAILED and not record_failures:
        typer.echo(f"error: {result['reason']}", err=True)
        raise typer.Exit(code=1)
    rate = f", {result['tiles_per_s']} tiles/s" if result.get("tiles_per_s") else ""
    typer.echo(f"{slide_id}: {result['status']}{' (existing store kept)' if result.get('reused') else ''}, "
               f"{result['n_tiles']} tiles{rate}{': ' + result['reason'] if result['reason'] else ''}")
