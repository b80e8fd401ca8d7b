"""Writers for slide formats the synthetic generator does not make: DICOM WSI series and Philips TIFF.

Each writer takes the decoded pixels of a synthetic slide (`synthetic_source`), so the written slide has the same
geometry and tissue as the source and the source's `SyntheticSpec.truth_mask` applies to it unchanged. Frames and
tiles are re-encoded as JPEG baseline: reads match the source within JPEG tolerance, not bit for bit.

The layouts follow the format descriptions OpenSlide documents (DICOM: PS3.3 VL Whole Slide Microscopy Image IOD,
TILED_FULL; Philips: a tiled TIFF whose ImageDescription is a `DPUfsImport` XML document).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import imagecodecs
import numpy as np
import tifffile

from wsi_pipeline.synthetic import SyntheticSpec, write_synthetic_slide

JPEG_QUALITY = 90


@dataclass(frozen=True)
class SourcePixels:
    """A synthetic slide's spec and its pixels as tifffile decodes them (the reference for every comparison)."""

    spec: SyntheticSpec
    levels: tuple[np.ndarray, ...]  # (h, w, 3) RGB per pyramid level
    label: np.ndarray
    macro: np.ndarray

    @property
    def objective_power(self) -> int:
        mpp = self.spec.mpp or 0.25
        return 40 if mpp <= 0.3 else 20 if mpp <= 0.6 else 10


def synthetic_source(path: Path, *, width: int = 4096, height: int = 3072, mpp: float = 0.5,
                     seed: int = 3) -> SourcePixels:
    """Write a synthetic Aperio SVS and decode its levels, label and macro with tifffile."""
    spec = write_synthetic_slide(path, width=width, height=height, mpp=mpp, seed=seed, fmt="svs")
    with tifffile.TiffFile(spec.path) as tf:
        series = {s.name: s for s in tf.series}
        levels = tuple(lvl.asarray() for lvl in series["Baseline"].levels)
        label, macro = series["Label"].asarray(), series["Macro"].asarray()
    return SourcePixels(spec, levels, label, macro)


def _tiles(img: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    """Row-major tile x tile crops; edge tiles are padded by repeating the last row/column (readers clip them)."""
    h, w = img.shape[:2]
    ph, pw = math.ceil(h / tile) * tile, math.ceil(w / tile) * tile
    padded = np.pad(img, ((0, ph - h), (0, pw - w), (0, 0)), mode="edge")
    for y in range(0, ph, tile):
        for x in range(0, pw, tile):
            yield np.ascontiguousarray(padded[y:y + tile, x:x + tile])


def _jpeg_422(img: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """Baseline JPEG in YCbCr with 4:2:2 chroma subsampling, which is what DICOM calls YBR_FULL_422."""
    return imagecodecs.jpeg8_encode(img, level=quality, colorspace="RGB", outcolorspace="YCBCR",
                                    subsampling=(2, 1))


# -- DICOM WSI --------------------------------------------------------------------------------------------------

def _code(value: str, scheme: str, meaning: str):
    from pydicom.dataset import Dataset

    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters)."""
    return f"{value:.10g}"[:16]


def _wsi_dataset(src: SourcePixels, uids: dict[str, str], image_type: list[str], size: tuple[int, int],
                 tile: tuple[int, int], n_frames: int, spacing_mm: float | None, instance: int):
    """One instance of the VL Whole Slide Microscopy Image IOD (TILED_FULL), without its pixel data."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import JPEGBaseline8Bit, VLWholeSlideMicroscopyImageStorage, generate_uid

    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = VLWholeSlideMicroscopyImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = JPEGBaseline8Bit

    ds = Dataset()
    ds.file_meta = meta
    # patient / study / series / equipment
    ds.SOPClassUID, ds.SOPInstanceUID = VLWholeSlideMicroscopyImageStorage, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
    ds.FrameOfReferenceUID, ds.DimensionOrganizationUID = uids["frame"], uids["dimension"]
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Synthetic^Slide", "SYNTH", "", ""
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20250101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "000000"
    ds.AcquisitionDateTime = "20250101000000"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "SM", 1, instance
    ds.Manufacturer, ds.ManufacturerModelName = "wsi_pipeline", "synthetic"
    ds.DeviceSerialNumber, ds.SoftwareVersions = "0", "1"
    ds.PositionReferenceIndicator = "SLIDE_CORNER"
    ds.BurnedInAnnotation = "YES" if image_type[2] == "LABEL" else "NO"
    ds.SpecimenLabelInImage = "YES" if image_type[2] in ("LABEL", "OVERVIEW") else "NO"
    ds.FocusMethod, ds.ExtendedDepthOfField, ds.VolumetricProperties = "AUTO", "NO", "VOLUME"
    # slide / specimen
    ds.ContainerIdentifier = f"SYNTH-{src.spec.seed}"
    ds.IssuerOfTheContainerIdentifierSequence = Sequence([])
    ds.ContainerTypeCodeSequence = Sequence([_code("433466003", "SCT", "Microscope slide")])
    ds.AcquisitionContextSequence = Sequence([])
    specimen = Dataset()
    specimen.SpecimenIdentifier, specimen.SpecimenUID = f"SYNTH-{src.spec.seed}", uids["specimen"]
    specimen.IssuerOfTheSpecimenIdentifierSequence = Sequence([])
    specimen.SpecimenPreparationSequence = Sequence([])
    ds.SpecimenDescriptionSequence = Sequence([specimen])
    # image pixel module: 8-bit YCbCr JPEG frames
    ds.ImageType = image_type
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.Rows, ds.Columns, ds.NumberOfFrames = tile[1], tile[0], n_frames
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows, ds.TotalPixelMatrixFocalPlanes = size[0], size[1], 1
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.NumberOfOpticalPaths = 1
    ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"
    ds.LossyImageCompressionRatio = _ds(size[0] * size[1] * 3 / max(1, n_frames * 2 ** 14))
    # slide geometry: matrix columns run along -Y of the slide, rows along -X (PS3.3 C.8.12.9)
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem = "20", "40"
    ds.TotalPixelMatrixOriginSequence = Sequence([origin])
    optical = Dataset()
    optical.OpticalPathIdentifier = "0"
    optical.IlluminationTypeCodeSequence = Sequence([_code("111744", "DCM", "Brightfield illumination")])
    optical.IlluminationColorCodeSequence = Sequence([_code("414298005", "SCT", "Full Spectrum")])
    optical.ObjectiveLensPower = _ds(src.objective_power)
    ds.OpticalPathSequence = Sequence([optical])
    frame_type = Dataset()
    frame_type.FrameType = image_type
    path_id = Dataset()
    path_id.OpticalPathIdentifier = "0"
    shared = Dataset()
    shared.WholeSlideMicroscopyImageFrameTypeSequence = Sequence([frame_type])
    shared.OpticalPathIdentificationSequence = Sequence([path_id])
    if spacing_mm is not None:
        ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = size[0] * spacing_mm, size[1] * spacing_mm  # FL, mm
        ds.ImagedVolumeDepth = 0.001
        measures = Dataset()
        measures.PixelSpacing = [_ds(spacing_mm), _ds(spacing_mm)]  # row spacing, column spacing (mm)
        measures.SliceThickness, measures.SpacingBetweenSlices = "0.001", "0.001"
        shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    return ds


def _save_with_frames(ds, frames: list[bytes], path: Path) -> None:
    from pydicom.encaps import encapsulate

    ds.add_new(0x7FE00010, "OB", encapsulate(frames, has_bot=True))  # PixelData, one fragment per frame
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)


def write_dicom_wsi(src: SourcePixels, folder: Path, *, tile: int = 256, associated: bool = True) -> list[Path]:
    """Write `src` as one DICOM WSI series in `folder`: one .dcm per pyramid level, plus label and overview.

    The pyramid's pixel spacing is the source MPP times each level's downsample (PixelSpacing is in mm)."""
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    uids = {k: generate_uid() for k in ("study", "series", "frame", "dimension", "specimen")}
    written = []
    for i, (img, ds_factor) in enumerate(zip(src.levels, src.spec.level_downsamples, strict=True)):
        frames = [_jpeg_422(t) for t in _tiles(img, tile)]
        image_type = ["DERIVED", "PRIMARY", "VOLUME", "NONE" if i == 0 else "RESAMPLED"]
        spacing = src.spec.mpp * ds_factor / 1000 if src.spec.mpp else None
        ds = _wsi_dataset(src, uids, image_type, (img.shape[1], img.shape[0]), (tile, tile), len(frames),
                          spacing, i + 1)
        path = folder / f"level-{i}.dcm"
        _save_with_frames(ds, frames, path)
        written.append(path)
    if associated:
        for n, (kind, img) in enumerate((("LABEL", src.label), ("OVERVIEW", src.macro))):
            size = (img.shape[1], img.shape[0])
            # a single frame as large as the image: how OpenSlide and wsidicom expect non-tiled images
            ds = _wsi_dataset(src, uids, ["DERIVED", "PRIMARY", kind, "NONE"], size, size, 1, None,
                              len(src.levels) + n + 1)
            path = folder / f"{kind.lower()}.dcm"
            _save_with_frames(ds, [_jpeg_422(img)], path)
            written.append(path)
    return written


# -- Philips TIFF -----------------------------------------------------------------------------------------------

def _attr(name: str, group: int, element: int, vr: str, value: str) -> str:
    return (f'<Attribute Name="{name}" Group="0x{group:04X}" Element="0x{element:04X}" PMSVR="{vr}">'
            f"{value}</Attribute>")


def _spacing(mm: float) -> str:
    return f'"{mm:.9g}" "{mm:.9g}"'  # row spacing, column spacing, each quoted


def philips_xml(src: SourcePixels) -> str:
    """The DPUfsImport document: scanned images (the WSI with one pixel-data representation per level, plus the
    label and macro as base64 JPEG), the pixel spacing OpenSlide turns into MPP and the derivation description
    whose `levels=` entry it reads as objective power."""
    mpp = src.spec.mpp or 0.25
    reps = []
    for i, (img, d) in enumerate(zip(src.levels, src.spec.level_downsamples, strict=True)):
        reps.append('<DataObject ObjectType="PixelDataRepresentation">'
                    + _attr("DICOM_PIXEL_SPACING", 0x0028, 0x0030, "IDoubleArray", _spacing(mpp * d / 1000))
                    + _attr("PIIM_PIXEL_DATA_REPRESENTATION_NUMBER", 0x101D, 0x1009, "IUInt32", str(i))
                    + _attr("PIIM_PIXEL_DATA_REPRESENTATION_COLUMNS", 0x2001, 0x115E, "IUInt32",
                            str(img.shape[1]))
                    + _attr("PIIM_PIXEL_DATA_REPRESENTATION_ROWS", 0x2001, 0x115D, "IUInt32", str(img.shape[0]))
                    + "</DataObject>")
    derivation = f"tiff-useBigTIFF=0-useRgb=0-levels={src.objective_power}-processing=0-q{JPEG_QUALITY}"
    wsi = ('<DataObject ObjectType="DPScannedImage">'
           + _attr("DICOM_DERIVATION_DESCRIPTION", 0x0008, 0x2111, "IString", escape(derivation))
           + _attr("DICOM_PIXEL_SPACING", 0x0028, 0x0030, "IDoubleArray", _spacing(mpp / 1000))
           + _attr("PIM_DP_IMAGE_TYPE", 0x101D, 0x1004, "IString", "WSI")
           + _attr("PIIM_PIXEL_DATA_REPRESENTATION_SEQUENCE", 0x1001, 0x8B01, "IDataObjectArray",
                   "<Array>" + "".join(reps) + "</Array>")
           + "</DataObject>")

    def associated(kind: str, img: np.ndarray) -> str:
        data = base64.b64encode(imagecodecs.jpeg8_encode(img, level=JPEG_QUALITY)).decode("ascii")
        return ('<DataObject ObjectType="DPScannedImage">'
                + _attr("PIM_DP_IMAGE_TYPE", 0x101D, 0x1004, "IString", kind)
                + _attr("PIM_DP_IMAGE_DATA", 0x101D, 0x1005, "IString", data)
                + "</DataObject>")

    barcode = base64.b64encode(f"SYNTH-{src.spec.seed}".encode()).decode("ascii")
    return ('<?xml version="1.0" encoding="UTF-8" ?>\n<DataObject ObjectType="DPUfsImport">'
            + _attr("DICOM_MANUFACTURER", 0x0008, 0x0070, "IString", "wsi_pipeline synthetic")
            + _attr("PIM_DP_UFS_BARCODE", 0x101D, 0x1002, "IString", barcode)
            + _attr("PIM_DP_SCANNED_IMAGES", 0x101D, 0x1003, "IDataObjectArray",
                    "<Array>" + wsi + associated("LABELIMAGE", src.label) + associated("MACROIMAGE", src.macro)
                    + "</Array>")
            + "</DataObject>\n")


def write_philips_tiff(src: SourcePixels, path: Path, *, tile: int = 256) -> Path:
    """Write `src` as a Philips TIFF: JPEG-tiled pyramid, Software 'Philips...', DPUfsImport XML on page 0."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mpp = src.spec.mpp or 0.25
    with tifffile.TiffWriter(path) as tw:
        for i, (img, d) in enumerate(zip(src.levels, src.spec.level_downsamples, strict=True)):
            first = {"description": philips_xml(src), "software": "Philips DP v1.0"} if i == 0 else {}
            tw.write(img, photometric="rgb", tile=(tile, tile), compression="jpeg",
                     compressionargs={"level": JPEG_QUALITY}, subsampling=(2, 2), subfiletype=int(i > 0),
                     metadata=None, resolution=(1e4 / (mpp * d), 1e4 / (mpp * d)), resolutionunit="CENTIMETER",
                     **first)
    return path
