"""The `tiling:` and `tissue:` config sections (pydantic models only): tile geometry and how tissue is masked."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Backend = Literal["auto", "openslide", "tiffslide"]
DEFAULT_BACKEND: Backend = "auto"  # the `backend:` default: OpenSlide, then TiffSlide


class TilingParams(BaseModel):
    """Tile geometry: `tile_px` x `tile_px` pixels at `target_mpp` µm/px (256 px at 0.5 µm/px = 128 µm, 20x)."""

    model_config = ConfigDict(extra="forbid")

    tile_px: int = Field(256, ge=16, le=8192, description="tile side in output pixels")
    target_mpp: float = Field(0.5, gt=0.05, le=50, description="microns per output pixel (0.5 = 20x, 0.25 = 40x)")
    overlap: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of a tile shared with its neighbour")
    min_tissue_fraction: float = Field(0.25, ge=0.0, le=1.0, description="drop tiles with less tissue than this")


class TissueParams(BaseModel):
    """How tissue is told from glass. Colours are OpenCV HSV: hue 0-179 (degrees / 2), saturation and value
    0-255. Sizes are in µm, areas in mm². The defaults suit H&E brightfield slides."""

    model_config = ConfigDict(extra="forbid")

    mask_mpp: float = Field(8.0, gt=0, description="µm/px the caller reads the slide at for the mask")
    saturation_threshold: float | Literal["otsu"] = Field(
        "otsu", description="saturation (0-255) above which a pixel is tissue, or 'otsu': per slide"
    )
    min_saturation: int = Field(15, ge=0, le=255, description="floor on Otsu: a blank slide gives nothing")
    blur_um: float = Field(16.0, ge=0, description="median blur diameter applied to the saturation channel")
    close_um: float = Field(32.0, ge=0, description="morphological closing diameter (joins nearby tissue)")
    open_um: float = Field(16.0, ge=0, description="morphological opening diameter (removes dust and lint)")
    min_tissue_area_mm2: float = Field(0.01, ge=0, description="tissue pieces smaller than this are dropped")
    min_hole_area_mm2: float = Field(0.005, ge=0, description="holes smaller than this are filled")
    fill_holes: bool = Field(False, description="fill every hole (tissue outline only)")
    remove_pen: bool = Field(True, description="mask out blue, green and black ink before thresholding")
    pen_blue_hue: tuple[int, int] = Field((100, 125), description="hue range of blue ink (200-250 degrees)")
    pen_green_hue: tuple[int, int] = Field((35, 99), description="hue of green/teal ink (70-198 degrees)")
    pen_min_saturation: int = Field(50, ge=0, le=255, description="blue/green ink is at least this saturated")
    pen_black_max_value: int = Field(80, ge=0, le=255, description="black ink: value at most this ...")
    pen_black_max_saturation: int = Field(90, ge=0, le=255, description="... and saturation at most this")
    pen_min_width_um: float = Field(24.0, ge=0, description="narrower ink blobs are ignored")
    pen_dilate_um: float = Field(24.0, ge=0, description="grow the ink mask by this to drop its halo")
    background_min_value: int = Field(235, ge=0, le=255, description="bright (value >= this) ...")
    background_max_saturation: int = Field(25, ge=0, le=255, description="... unsaturated pixels are glass")
    black_max_value: int = Field(40, ge=0, le=255, description="this dark is never tissue (borders)")
    modality: Literal["auto", "brightfield", "fluorescence"] = Field(
        "auto", description="auto: fluorescence when the slide is mostly dark with no glass, else brightfield"
    )
    min_intensity: int = Field(
        20, ge=0, le=255, description="fluorescence: floor on the Otsu intensity threshold (a dark slide gives nothing)"
    )

    @model_validator(mode="after")
    def _check(self) -> TissueParams:
        for name in ("pen_blue_hue", "pen_green_hue"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi <= 179:
                raise ValueError(f"{name} must be (low, high) with 0 <= low <= high <= 179, got {(lo, hi)}")
        t = self.saturation_threshold
        if not isinstance(t, str) and not 0 <= t <= 255:
            raise ValueError(f"saturation_threshold must be in [0, 255] or 'otsu', got {t}")
        return self
