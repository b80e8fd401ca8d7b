"""Stage 2 for one slide: tile table -> encoder -> `RESULTS/features/{encoder}/{slide_id}.zarr` + sidecar.

A slide is encoded under an exclusive lock on `features/{encoder}/.locks/{slide_id}.lock` into a temporary store
that is renamed into place when complete, so concurrent runs never mix chunks and a killed run leaves only a
temporary (removed, under the lock, by the next run, which redoes the slide from scratch). The sidecar is written
always: ok, no tissue (an empty store), skipped (stage 1 failed or never ran) or failed, with the reason, time and
tiles/s; a full or read-only disk fails the slide like a bad slide does. A slide already done is reported without
taking the lock, so finished results can be read where they cannot be written. Cohorts over several devices live
in `sharding.py`; the workflow's jobs in `jobs.py`.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from .. import __version__
from ..devices import resolve_device
from ..encoders import EncoderConfig, TileEncoder, build_encoder
from ..errors import PipelineError
from ..io.atomic import atomic_group, remove_stale_temporaries
from ..io.faults import (
    FEATURE_ROW_OVERHEAD_BYTES,
    FEATURE_STORE_OVERHEAD_BYTES,
    StorageError,
    describe_os_error,
    storage_error,
)
from ..io.jsonio import to_jsonable
from ..io.locks import file_lock
from ..io.zarr_access import attrs_dict
from ..layout import STATUS_FAILED, STATUS_NO_TISSUE, STATUS_OK, STATUS_SKIPPED, ResultsLayout
from ..slide.fingerprint import check_same_slide
from ..tiling.geometry import geometry_from_attrs
from ..tiling.table import TileTable, read_tile_attrs, read_tile_table, tiles_signature
from .config import EncodeParams
from .loader import SlideSource, TileBatchDataset, encode_rows
from .sidecar import EncodeSidecar
from .store import ShardWriter, StoreLayout, create_feature_arrays, is_complete_store, plan_layout

log = logging.getLogger(__name__)

NO_TISSUE_REASON = "stage 1 found no tissue (0 tiles): empty store written"


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

    @property
    def embed_dim(self) -> int | None:
        """The built encoder's embedding size; None before it is built (nothing is loaded to find out)."""
        return self._enc.embed_dim if self._enc is not None else None

    def provenance(self) -> dict[str, Any]:
        if self._prov is None:  # hashing weights and importing libraries for their versions: once per run
            t = time.perf_counter()
            self._prov = to_jsonable(self.get().provenance())
            self.load_seconds += time.perf_counter() - t if self.builds == 0 else 0.0
        return self._prov


class SkipSlide(Exception):
    """Stage 1 produced nothing to encode (failed, or never ran for the slide)."""


def load_tile_table(results: Path, slide_id: str) -> TileTable:
    """The slide's tile table, or `SkipSlide` when stage 1 failed or never ran for it."""
    layout = ResultsLayout(results)
    side = layout.tile_sidecar(slide_id)
    if side.is_file():
        meta = json.loads(side.read_text())
        if meta.get("status") == STATUS_FAILED:
            raise SkipSlide(f"stage 1 failed: {meta.get('reason', '')}")
    store = layout.tile_store(slide_id)
    if not (store / "zarr.json").is_file():
        raise SkipSlide(f"{store}: no tile store; run `wsi-pipeline tile` for this slide first")
    return read_tile_table(store)


def expected_attrs(cfg: EncoderConfig, dtype: str, tile_attrs: dict[str, Any]) -> dict[str, Any]:
    """What a reusable feature store's attributes must say: same encoder config, dtype and tile table."""
    return {
        "encoder": cfg.name,
        "encoder_config": to_jsonable(cfg.model_dump()),
        "dtype": dtype,
        "tiles": to_jsonable(tiles_signature(tile_attrs)),
    }


def _store_attrs(
    slide_id: str,
    table: TileTable,
    cfg: EncoderConfig,
    handle: EncoderHandle,
    params: EncodeParams,
    layout: StoreLayout,
    n_rows: int,
    results: Path,
) -> dict[str, Any]:
    prov = handle.provenance()
    tiles = ResultsLayout(results).tile_store(slide_id)
    return to_jsonable(
        {
            **expected_attrs(cfg, params.dtype, table.attrs),
            "slide_id": slide_id,
            "n_tiles": n_rows,
            "embed_dim": prov["embed_dim"],
            "revision": prov.get("revision"),
            "weights_sha256": prov.get("weights_sha256"),
            "preprocessing": prov.get("preprocessing"),
            "provenance": prov,
            "tile_geometry": geometry_from_attrs(table.attrs).to_dict(),
            "slide_path": table.attrs.get("slide_path"),
            "tile_store": str(tiles.resolve()),
            "tile_store_rel": f"../../tiles/{slide_id}.zarr",
            "coords_level": 0,
            "layout": layout.to_dict(),
            "batch_size": params.batch_size,
            "package_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            # this store's identity: new at every write, so what was computed from an earlier store (concept
            # scores) is told apart even when both were written within one second
            "store_id": uuid.uuid4().hex,
            "complete": False,
        }
    )


def write_feature_store(
    path: Path,
    slide_id: str,
    table: TileTable,
    start: int,
    stop: int,
    cfg: EncoderConfig,
    handle: EncoderHandle,
    params: EncodeParams,
    results: Path,
    extra: dict[str, Any],
    layout: StoreLayout | None = None,
) -> int:
    """Encode rows [start, stop) of `table` into a new store at `path` (atomic); returns the final batch size."""
    enc = handle.get()
    n = stop - start
    layout = layout or plan_layout(n, enc.embed_dim, params.dtype)
    source = SlideSource.from_tile_attrs(table.attrs)
    with atomic_group(path) as g:
        feats, coords = create_feature_arrays(g, n, enc.embed_dim, params.dtype, layout)
        cw = ShardWriter(coords)
        cw.append(table.coords[start:stop])
        cw.close()
        g.update_attributes({**_store_attrs(slide_id, table, cfg, handle, params, layout, n, results), **extra})
        final_batch = params.batch_size
        if n:
            source.check_unchanged()
            ds = TileBatchDataset(
                source, geometry_from_attrs(table.attrs), table.coords, params.batch_size, start, stop
            )
            final_batch = encode_rows(
                enc,
                ds,
                ShardWriter(feats),
                dtype=params.dtype,
                num_workers=params.reader_processes(),
                prefetch_factor=params.prefetch_factor,
                context=f"{slide_id} (encoder {cfg.name})",
            )
        g.update_attributes({"complete": True, "batch_size_final": final_batch})
    return final_batch


def new_sidecar(slide_id: str, cfg: EncoderConfig, device: torch.device | str, params: EncodeParams) -> EncodeSidecar:
    """A slide's sidecar before any work: status failed until the work says otherwise."""
    return EncodeSidecar(
        slide_id=slide_id,
        encoder=cfg.name,
        device=str(device),
        batch_size=params.batch_size,
        num_workers=params.reader_processes(),
        dtype=params.dtype,
        package_version=__version__,
    )


def encode_whole_slide(
    results: Path,
    slide_id: str,
    cfg: EncoderConfig,
    params: EncodeParams,
    handle: EncoderHandle,
    force: bool,
    layout: StoreLayout | None = None,
) -> EncodeSidecar:
    """Encode every tile of one slide into its store, under the slide lock; never raises for a bad slide.

    A disk fault (full, read-only, a file in the way) fails the slide with one line in its sidecar, like a bad
    slide; only when the sidecar itself cannot be written does it raise (`StorageError`, that line)."""
    paths = ResultsLayout(results)
    done = None if force else finished_slide(results, slide_id, cfg, params)
    if done is not None:  # nothing to write: no lock either, so finished results on a read-only share still work
        return done
    try:
        with file_lock(paths.feature_lock(cfg.name, slide_id)):
            return _encode_locked(paths, slide_id, cfg, params, handle, force, layout)
    except OSError as err:  # the lock could not be taken: nothing was written, not even a sidecar
        raise storage_error(err, paths.feature_dir(cfg.name)) from None


def _encode_locked(
    paths: ResultsLayout,
    slide_id: str,
    cfg: EncoderConfig,
    params: EncodeParams,
    handle: EncoderHandle,
    force: bool,
    layout: StoreLayout | None,
) -> EncodeSidecar:
    results = paths.root
    store, sidecar_path = paths.feature_store(cfg.name, slide_id), paths.feature_sidecar(cfg.name, slide_id)
    side = new_sidecar(slide_id, cfg, handle.device, params)
    started = time.perf_counter()
    disk_fault = False
    try:
        table = load_tile_table(results, slide_id)
        side.n_tiles = len(table)
        if table.attrs.get("modality") == "fluorescence":  # every encoder here learnt from brightfield images
            side.warnings.append(
                f"fluorescence slide encoded with {cfg.name}, an encoder trained on brightfield (H&E) images: its "
                "features may not mean what they mean on H&E; compare against brightfield slides with care"
            )
            log.warning("%s: %s", slide_id, side.warnings[-1])
        # a slide replaced since tiling (same name, same size, old date) must not pass as its old features
        check_same_slide(str(table.attrs.get("slide_path", "")), table.attrs.get("slide_fingerprint"))
        if not force and is_complete_store(store, expected_attrs(cfg, params.dtype, table.attrs)):
            return _reuse(paths, cfg.name, slide_id, side)
        remove_stale_temporaries(store)
        loads = handle.load_seconds
        side.batch_size_final = write_feature_store(
            store, slide_id, table, 0, len(table), cfg, handle, params, results, {}, layout
        )
        side.status = STATUS_OK if len(table) else STATUS_NO_TISSUE
        side.reason = "" if len(table) else NO_TISSUE_REASON
        side.store = paths.rel(store)
        side.model_load_seconds = round(handle.load_seconds - loads, 3)
    except SkipSlide as why:
        side.status, side.reason = STATUS_SKIPPED, str(why)
    except PipelineError as err:
        side.status, side.reason = STATUS_FAILED, str(err)
        log.info("%s: failed: %s", slide_id, err)
    except OSError as err:  # disk full, read-only, a file in the way: the slide fails, the cohort goes on
        need = _store_bytes(side.n_tiles, handle, params)
        side.status, side.reason = (
            STATUS_FAILED,
            describe_os_error(err, store.parent, need_bytes=need, need_what="this slide's features need about"),
        )
        disk_fault = True
        log.info("%s: failed: %s", slide_id, side.reason)
    try:
        side.finish(time.perf_counter() - started - (side.model_load_seconds or 0.0), sidecar_path)
    except OSError as err:  # the outcome cannot even be recorded: say the first disk fault, in one line
        if disk_fault:
            raise StorageError(side.reason) from None
        raise storage_error(err, sidecar_path.parent) from None
    return side


def _store_bytes(n_tiles: int, handle: EncoderHandle, params: EncodeParams) -> int | None:
    """About what a slide's feature store takes on disk (embeddings barely compress), when the encoder is built."""
    dim = handle.embed_dim
    if dim is None:
        return None
    return n_tiles * (dim * np.dtype(params.dtype).itemsize + FEATURE_ROW_OVERHEAD_BYTES) + FEATURE_STORE_OVERHEAD_BYTES


def finished_slide(
    results: Path,
    slide_id: str,
    cfg: EncoderConfig,
    params: EncodeParams,
    complete_for: dict[str, Any] | None = None,
) -> EncodeSidecar | None:
    """The slide's sidecar (marked reused) when its store is complete for this config and the sidecar says so;
    None otherwise. Reads only: a published store is complete and never changes under its name, so no lock.
    `complete_for`: the tile store's attributes, when the caller has just checked the feature store against them."""
    paths = ResultsLayout(results)
    store, sidecar_path = paths.feature_store(cfg.name, slide_id), paths.feature_sidecar(cfg.name, slide_id)
    try:
        table_attrs = complete_for or read_tile_attrs(paths.tile_store(slide_id))
        if table_attrs is None or not sidecar_path.is_file():
            return None
        if complete_for is None and not is_complete_store(store, expected_attrs(cfg, params.dtype, table_attrs)):
            return None
        check_same_slide(str(table_attrs.get("slide_path", "")), table_attrs.get("slide_fingerprint"))
        old = EncodeSidecar.read(sidecar_path)
    except (OSError, ValueError, PipelineError):  # unreadable, replaced or half-understood: the locked path decides
        return None
    return old.model_copy(update={"reused": True}) if _reusable(old) else None


def _reusable(side: EncodeSidecar) -> bool:
    return side.status in (STATUS_OK, STATUS_NO_TISSUE, STATUS_SKIPPED) and bool(side.store)


def _reuse(paths: ResultsLayout, encoder: str, slide_id: str, side: EncodeSidecar) -> EncodeSidecar:
    """A complete store exists: keep it (and its sidecar when that says it is done)."""
    sidecar_path, store = paths.feature_sidecar(encoder, slide_id), paths.feature_store(encoder, slide_id)
    if sidecar_path.is_file():
        old = EncodeSidecar.read(sidecar_path)
        if _reusable(old):
            return old.model_copy(update={"reused": True})
    attrs = attrs_dict(zarr.open_group(str(store), mode="r"))
    n = int(attrs["n_tiles"])
    side.status = STATUS_OK if n else STATUS_NO_TISSUE
    side.reason = "" if n else NO_TISSUE_REASON
    side.store, side.seconds, side.tiles_per_s = paths.rel(store), 0.0, None
    side.batch_size_final = attrs.get("batch_size_final")
    side.write(sidecar_path)
    return side.model_copy(update={"reused": True})


def encode_slide(
    results: str | Path,
    slide_id: str,
    encoder_cfg: EncoderConfig,
    params: EncodeParams | None = None,
    *,
    force: bool = False,
    encoder: TileEncoder | None = None,
    layout: StoreLayout | None = None,
    **overrides: Any,
) -> EncodeSidecar:
    """Encode one slide's tiles into its feature store; never raises for a bad slide (see the returned sidecar).

    `params` is the `encode:` section (defaults: `EncodeParams()` with 0 reader processes); any of its fields may be
    given by name (`batch_size=32, device="cuda:1"`). Pass a built `encoder` to reuse one model across slides."""
    params = (params or EncodeParams(num_workers=0)).with_overrides(**overrides)
    dev = encoder.device if encoder is not None else resolve_device(params.device)
    handle = EncoderHandle(encoder_cfg, dev, encoder)
    return encode_whole_slide(Path(results), slide_id, encoder_cfg, params, handle, force, layout)
