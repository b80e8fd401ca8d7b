"""Files: pyramid levels, tile encoders, label / macro images and the SVS, TIFF, OME-TIFF and flat writers.

:func:`write_synthetic_slide` validates its arguments, builds the scene and hands the painter's encoded tiles to
tifffile in the layout each format (and OpenSlide / TiffSlide) expects.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import imagecodecs
import numpy as np
import tifffile

from .render import STAINS, Painter
from .scene import Region, SyntheticSpec, default_regions, place_pens
from .textures import TEXTURES

FORMATS = ("svs", "tiff", "flat", "ome")
APERIO_HEAD = "Aperio Image Library v12.0.15"


def _levels(width: int, height: int, tile_size: int) -> tuple[float, ...]:
    """Downsamples 1, 4, 16, ... until the smallest level fits in about two tiles (Aperio-like)."""
    ds = [1.0]
    while max(width, height) / ds[-1] > 2 * tile_size:
        ds.append(ds[-1] * 4)
    return tuple(ds)


def _encoder(compression: str, quality: int, rgb_jpeg: bool) -> tuple[Callable[[np.ndarray], bytes | bytearray], dict]:
    """Tile encoder plus the matching tifffile tag arguments (tiles are handed to tifffile pre-encoded)."""
    if compression == "jpeg":
        # Aperio stores JPEG tiles in RGB colour space without chroma subsampling (photometric RGB);
        # generic TIFFs use the usual YCbCr 4:2:0.
        out, sub = ("RGB", (1, 1)) if rgb_jpeg else ("YCBCR", (2, 2))

        def enc(a: np.ndarray) -> bytes | bytearray:
            return imagecodecs.jpeg_encode(a, level=quality, colorspace="RGB", outcolorspace=out, subsampling=sub)

        return enc, {"compression": "jpeg", "subsampling": sub, "compressionargs": {"outcolorspace": out}}
    if compression in ("zlib", "deflate"):
        return (lambda a: imagecodecs.zlib_encode(a.tobytes(), level=6)), {"compression": "zlib"}
    if compression == "lzw":
        return (lambda a: imagecodecs.lzw_encode(a.tobytes())), {"compression": "lzw"}
    if compression == "none":
        return (lambda a: a.tobytes()), {"compression": None}
    raise ValueError(f"unknown compression {compression!r}; use jpeg, zlib, lzw or none")


def _label_image(seed: int, text: str) -> np.ndarray:
    """A white slide label with a barcode and the slide name."""
    rng = np.random.default_rng([seed, 5])
    img = np.full((400, 400, 3), 250, np.uint8)
    x = 40
    while x < 360:
        w = int(rng.integers(2, 7))
        img[40:200, x : x + w] = 10
        x += w + int(rng.integers(2, 6))
    cv2.putText(img, "SYNTHETIC", (40, 260), cv2.FONT_HERSHEY_SIMPLEX, 1.2, (10, 10, 10), 3, cv2.LINE_AA)
    cv2.putText(img, text[:16], (40, 330), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (10, 10, 10), 2, cv2.LINE_AA)
    return img


def _macro_image(label: np.ndarray, thumb: np.ndarray) -> np.ndarray:
    """Photo of the whole glass slide: label on the left, tissue area on the right (1280 x 432)."""
    img = np.full((432, 1280, 3), 208, np.uint8)
    img[16:416, 16:416] = cv2.resize(label, (400, 400), interpolation=cv2.INTER_AREA)
    h, w = thumb.shape[:2]
    f = min(400 / h, 820 / w)
    th = cv2.resize(thumb, (max(1, int(w * f)), max(1, int(h * f))), interpolation=cv2.INTER_AREA)
    y, x = (432 - th.shape[0]) // 2, 440 + (820 - th.shape[1]) // 2
    img[y : y + th.shape[0], x : x + th.shape[1]] = th
    return img


def _write_svs(spec: SyntheticSpec, painter: Painter, tags: dict, big: bool) -> None:
    w, h, t, q = spec.width, spec.height, spec.tile_size, spec.jpeg_quality
    mpp = spec.mpp
    mag = 40 if mpp is None or mpp <= 0.3 else 20 if mpp <= 0.6 else 10
    head = f"{APERIO_HEAD}\r\n{w}x{h} [0,0 {w}x{h}] ({t}x{t})"
    meta = (
        f"|AppMag = {mag}|StripeWidth = 2040|ScanScope ID = SYNTH|Filename = {spec.path.stem}"
        "|Date = 01/01/25|Time = 00:00:00" + (f"|MPP = {mpp:.4f}" if mpp else "") + f"|SyntheticSeed = {spec.seed}"
    )
    jpeg = {"photometric": "rgb", "metadata": None, **tags}
    label = _label_image(spec.seed, spec.path.stem)
    with tifffile.TiffWriter(spec.path, bigtiff=big) as tw:
        for i, (lw, lh) in enumerate(spec.level_dimensions):
            desc = f"{head} JPEG/RGB Q={q}{meta}" if i == 0 else f"{head} -> {lw}x{lh} JPEG/RGB Q={q}"
            tw.write(painter.tiles(i), shape=(lh, lw, 3), dtype=np.uint8, tile=(t, t), description=desc, **jpeg)
            if i == 0:  # Aperio puts the stripped thumbnail right after level 0
                thumb = painter.thumbnail(min(768, max(w, h) // 4))
                size = f"{thumb.shape[1]}x{thumb.shape[0]}"
                tw.write(thumb, rowsperstrip=16, description=f"{APERIO_HEAD}\n{w}x{h} -> {size} - {meta}", **jpeg)
        tw.write(
            label,
            photometric="rgb",
            compression="lzw",
            predictor=True,
            rowsperstrip=16,
            subfiletype=1,
            description=f"{APERIO_HEAD}\nlabel {label.shape[1]}x{label.shape[0]}",
            metadata=None,
        )
        macro = _macro_image(label, thumb)
        tw.write(
            macro,
            rowsperstrip=16,
            subfiletype=9,
            description=f"{APERIO_HEAD}\nmacro {macro.shape[1]}x{macro.shape[0]}",
            **jpeg,
        )


def _resolution(mpp: float | None, ds: float) -> dict:
    """Resolution tags in pixels per centimetre (OpenSlide derives openslide.mpp-x from these)."""
    if mpp is None:
        return {}
    return {"resolution": (1e4 / (mpp * ds), 1e4 / (mpp * ds)), "resolutionunit": "CENTIMETER"}


def _write_pyramid(spec: SyntheticSpec, painter: Painter, tags: dict, big: bool, ome: bool) -> None:
    t, n = spec.tile_size, len(spec.level_downsamples)
    kw = {"photometric": "rgb", "tile": (t, t), "dtype": np.uint8, **tags}
    with tifffile.TiffWriter(spec.path, bigtiff=big, ome=ome) as tw:
        for i, ((lw, lh), ds) in enumerate(zip(spec.level_dimensions, spec.level_downsamples, strict=True)):
            if ome and i == 0:
                md: dict = {"axes": "YXS", "Name": spec.path.stem}
                if spec.mpp:
                    md.update(
                        PhysicalSizeX=spec.mpp, PhysicalSizeXUnit="µm", PhysicalSizeY=spec.mpp, PhysicalSizeYUnit="µm"
                    )
                extra: dict = {"subifds": n - 1, "metadata": md}
            elif ome:
                extra = {"subfiletype": 1, "metadata": None}
            else:
                extra = {
                    "subfiletype": int(i > 0),
                    "metadata": None,
                    "description": f"wsi_pipeline synthetic slide seed={spec.seed}" if i == 0 else None,
                }
            tw.write(painter.tiles(i), shape=(lh, lw, 3), **kw, **extra, **_resolution(spec.mpp, ds))


def write_synthetic_slide(
    path: str | Path,
    *,
    width: int = 8192,
    height: int = 6144,
    mpp: float | None = 0.25,
    fmt: str = "svs",
    regions: Sequence[Region] | None = None,
    tile_size: int = 256,
    compression: str = "jpeg",
    jpeg_quality: int = 80,
    seed: int = 0,
    stain: str = "he",
    nuclei_density: float = 1.0,
    pen_marks: Sequence[str] = (),
    black_border: bool = False,
    level_downsamples: Sequence[float] | None = None,
    textures: Sequence[str] | None = None,
) -> SyntheticSpec:
    """Write a synthetic slide and return its spec (geometry, levels, pen marks, textures) for assertions.

    ``regions=None`` uses :func:`default_regions`; ``regions=()`` writes a blank slide. ``textures`` names one
    texture of ``TEXTURES`` per region (tumour, stroma, ...; ``spec.texture_at`` is then the ground truth);
    None draws every region with the stain preset and ``nuclei_density`` alone."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown slide format {fmt!r}; use one of {FORMATS}")
    if stain not in STAINS:
        raise ValueError(f"unknown stain preset {stain!r}; use one of {sorted(STAINS)}")
    if tile_size % 16 or not 16 <= tile_size <= 512:
        raise ValueError(f"tile_size={tile_size} must be a multiple of 16 between 16 and 512")
    if fmt == "svs" and compression != "jpeg":
        raise ValueError("Aperio SVS slides are written with JPEG tiles; use compression='jpeg'")
    if fmt == "flat" and width * height > 100_000_000:
        raise ValueError(f"flat slides are held in memory; {width}x{height} is too large (max 1e8 px)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    regs = default_regions(width, height, seed) if regions is None else tuple(regions)
    texs = () if textures is None else tuple(str(x) for x in ([textures] if isinstance(textures, str) else textures))
    unknown = sorted(set(texs) - set(TEXTURES))
    if unknown:
        raise ValueError(f"unknown textures {unknown}; use names of {TEXTURES}")
    if textures is not None and len(texs) != len(regs):
        raise ValueError(f"textures gives {len(texs)} names for {len(regs)} regions; give one texture per region")
    if texs and stain == "fluorescence":
        raise ValueError("named textures are brightfield H&E; use stain he, he_light or he_dark with textures")
    pens = place_pens(pen_marks, width, height, regs, seed)
    ds = tuple(float(d) for d in level_downsamples) if level_downsamples else _levels(width, height, tile_size)
    ds = (1.0,) if fmt == "flat" else ds
    if ds[0] != 1.0 or any(b <= a for a, b in zip(ds, ds[1:], strict=False)):
        raise ValueError(f"level_downsamples={ds} must start at 1 and increase")
    spec = SyntheticSpec(
        path=path,
        width=width,
        height=height,
        mpp=mpp,
        fmt=fmt,
        regions=regs,
        tile_size=tile_size,
        level_downsamples=ds,
        seed=seed,
        stain=stain,
        nuclei_density=nuclei_density,
        pen_marks=pens,
        border_width=max(1, round(0.015 * min(width, height))) if black_border else 0,
        compression=compression,
        jpeg_quality=jpeg_quality,
        associated=("label", "macro", "thumbnail") if fmt == "svs" else (),
        textures=texs,
    )
    encode, tags = _encoder(compression, jpeg_quality, rgb_jpeg=fmt == "svs")
    painter = Painter(spec, encode)
    big = width * height * 3 > 2**31  # raw size over 2 GiB: classic TIFF offsets could overflow
    if fmt == "svs":
        _write_svs(spec, painter, tags, big)
    elif fmt in ("tiff", "ome"):
        _write_pyramid(spec, painter, tags, big, ome=fmt == "ome")
    else:
        tags = {k: v for k, v in tags.items() if k != "compressionargs"}
        if compression == "jpeg":
            tags["compressionargs"] = {"level": jpeg_quality}
        tifffile.imwrite(
            path,
            painter.full(),
            photometric="rgb",
            rowsperstrip=64,
            metadata=None,
            description=f"wsi_pipeline synthetic flat slide seed={seed}",
            **tags,
            **_resolution(mpp, 1.0),
        )
    return spec
