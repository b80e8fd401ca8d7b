"""Writers for slide formats the synthetic generator does not make: DICOM WSI series, Philips TIFF, Hamamatsu NDPI.

Each writer takes the decoded pixels of a synthetic slide (`synthetic_source`), so the written slide has the same
geometry and tissue as the source and the source's `SyntheticSpec.truth_mask` applies to it unchanged. Frames and
tiles are re-encoded as JPEG baseline: reads match the source within JPEG tolerance, not bit for bit.

The layouts follow the format descriptions OpenSlide documents (DICOM: PS3.3 VL Whole Slide Microscopy Image IOD,
TILED_FULL; Philips: a tiled TIFF whose ImageDescription is a `DPUfsImport` XML document; NDPI: restart-marked
JPEG strips in a TIFF-like file with 64-bit IFD offsets).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Iterator
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


def synthetic_source(
    path: Path, *, width: int = 4096, height: int = 3072, mpp: float = 0.5, seed: int = 3
) -> SourcePixels:
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
            yield np.ascontiguousarray(padded[y : y + tile, x : x + tile])


def _jpeg_422(img: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """Baseline JPEG in YCbCr with 4:2:2 chroma subsampling, which is what DICOM calls YBR_FULL_422."""
    return imagecodecs.jpeg8_encode(img, level=quality, colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 1))


def _jpeg_420_jfif(img: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """Baseline JPEG as any image library writes an RGB picture by default: a JFIF APP0 marker and 4:2:0 YCbCr."""
    data = imagecodecs.jpeg8_encode(img, level=quality, colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 2))
    assert data[2:4] == b"\xff\xe0" and data[6:11] == b"JFIF\0", "the encoder no longer writes a JFIF marker"
    return data


# -- DICOM WSI --------------------------------------------------------------------------------------------------


def _code(value: str, scheme: str, meaning: str):
    from pydicom.dataset import Dataset

    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters)."""
    return f"{value:.10g}"[:16]


def _wsi_dataset(
    src: SourcePixels,
    uids: dict[str, str],
    image_type: list[str],
    size: tuple[int, int],
    tile: tuple[int, int],
    n_frames: int,
    spacing_mm: float | None,
    instance: int,
    photometric: str = "YBR_FULL_422",
):
    """One instance of the VL Whole Slide Microscopy Image IOD (TILED_FULL), without its pixel data.

    `photometric` is what the header claims the JPEG frames hold (YBR_FULL_422 unless a test writes a wrong one)."""
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
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, photometric, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.Rows, ds.Columns, ds.NumberOfFrames = tile[1], tile[0], n_frames
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows, ds.TotalPixelMatrixFocalPlanes = size[0], size[1], 1
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.NumberOfOpticalPaths = 1
    ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"
    ds.LossyImageCompressionRatio = _ds(size[0] * size[1] * 3 / max(1, n_frames * 2**14))
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


def write_dicom_wsi(
    src: SourcePixels,
    folder: Path,
    *,
    tile: int = 256,
    associated: bool = True,
    photometric: str = "YBR_FULL_422",
    encode: Callable[[np.ndarray], bytes] = _jpeg_422,
) -> list[Path]:
    """Write `src` as one DICOM WSI series in `folder`: one .dcm per pyramid level, plus label and overview.

    The pyramid's pixel spacing is the source MPP times each level's downsample (PixelSpacing is in mm). Every
    frame is `encode`d and every instance's header says `photometric` (the defaults agree: 4:2:2 YCbCr frames)."""
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    uids = {k: generate_uid() for k in ("study", "series", "frame", "dimension", "specimen")}
    written = []
    for i, (img, ds_factor) in enumerate(zip(src.levels, src.spec.level_downsamples, strict=True)):
        frames = [encode(t) for t in _tiles(img, tile)]
        image_type = ["DERIVED", "PRIMARY", "VOLUME", "NONE" if i == 0 else "RESAMPLED"]
        spacing = src.spec.mpp * ds_factor / 1000 if src.spec.mpp else None
        ds = _wsi_dataset(
            src, uids, image_type, (img.shape[1], img.shape[0]), (tile, tile), len(frames), spacing, i + 1, photometric
        )
        path = folder / f"level-{i}.dcm"
        _save_with_frames(ds, frames, path)
        written.append(path)
    if associated:
        for n, (kind, img) in enumerate((("LABEL", src.label), ("OVERVIEW", src.macro))):
            size = (img.shape[1], img.shape[0])
            # a single frame as large as the image: how OpenSlide and wsidicom expect non-tiled images
            ds = _wsi_dataset(
                src,
                uids,
                ["DERIVED", "PRIMARY", kind, "NONE"],
                size,
                size,
                1,
                None,
                len(src.levels) + n + 1,
                photometric,
            )
            path = folder / f"{kind.lower()}.dcm"
            _save_with_frames(ds, [encode(img)], path)
            written.append(path)
    return written


def write_mislabelled_rgb_dicom_wsi(
    src: SourcePixels, folder: Path, *, tile: int = 256, associated: bool = True
) -> list[Path]:
    """`write_dicom_wsi` as some converters get it wrong: every frame (label and overview too) is a JFIF JPEG holding
    4:2:0 YCbCr, but every header says PhotometricInterpretation RGB. OpenSlide and wsidicom trust the header and
    hand the YCbCr values back as RGB (a white background reads ~(242, 128, 128))."""
    return write_dicom_wsi(src, folder, tile=tile, associated=associated, photometric="RGB", encode=_jpeg_420_jfif)


# -- Philips TIFF -----------------------------------------------------------------------------------------------


def _attr(name: str, group: int, element: int, vr: str, value: str) -> str:
    return f'<Attribute Name="{name}" Group="0x{group:04X}" Element="0x{element:04X}" PMSVR="{vr}">{value}</Attribute>'


def _spacing(mm: float) -> str:
    return f'"{mm:.9g}" "{mm:.9g}"'  # row spacing, column spacing, each quoted


def philips_xml(src: SourcePixels) -> str:
    """The DPUfsImport document: scanned images (the WSI with one pixel-data representation per level, plus the
    label and macro as base64 JPEG), the pixel spacing OpenSlide turns into MPP and the derivation description
    whose `levels=` entry it reads as objective power."""
    mpp = src.spec.mpp or 0.25
    reps = []
    for i, (img, d) in enumerate(zip(src.levels, src.spec.level_downsamples, strict=True)):
        reps.append(
            '<DataObject ObjectType="PixelDataRepresentation">'
            + _attr("DICOM_PIXEL_SPACING", 0x0028, 0x0030, "IDoubleArray", _spacing(mpp * d / 1000))
            + _attr("PIIM_PIXEL_DATA_REPRESENTATION_NUMBER", 0x101D, 0x1009, "IUInt32", str(i))
            + _attr("PIIM_PIXEL_DATA_REPRESENTATION_COLUMNS", 0x2001, 0x115E, "IUInt32", str(img.shape[1]))
            + _attr("PIIM_PIXEL_DATA_REPRESENTATION_ROWS", 0x2001, 0x115D, "IUInt32", str(img.shape[0]))
            + "</DataObject>"
        )
    derivation = f"tiff-useBigTIFF=0-useRgb=0-levels={src.objective_power}-processing=0-q{JPEG_QUALITY}"
    wsi = (
        '<DataObject ObjectType="DPScannedImage">'
        + _attr("DICOM_DERIVATION_DESCRIPTION", 0x0008, 0x2111, "IString", escape(derivation))
        + _attr("DICOM_PIXEL_SPACING", 0x0028, 0x0030, "IDoubleArray", _spacing(mpp / 1000))
        + _attr("PIM_DP_IMAGE_TYPE", 0x101D, 0x1004, "IString", "WSI")
        + _attr(
            "PIIM_PIXEL_DATA_REPRESENTATION_SEQUENCE",
            0x1001,
            0x8B01,
            "IDataObjectArray",
            "<Array>" + "".join(reps) + "</Array>",
        )
        + "</DataObject>"
    )

    def associated(kind: str, img: np.ndarray) -> str:
        data = base64.b64encode(imagecodecs.jpeg8_encode(img, level=JPEG_QUALITY)).decode("ascii")
        return (
            '<DataObject ObjectType="DPScannedImage">'
            + _attr("PIM_DP_IMAGE_TYPE", 0x101D, 0x1004, "IString", kind)
            + _attr("PIM_DP_IMAGE_DATA", 0x101D, 0x1005, "IString", data)
            + "</DataObject>"
        )

    barcode = base64.b64encode(f"SYNTH-{src.spec.seed}".encode()).decode("ascii")
    return (
        '<?xml version="1.0" encoding="UTF-8" ?>\n<DataObject ObjectType="DPUfsImport">'
        + _attr("DICOM_MANUFACTURER", 0x0008, 0x0070, "IString", "wsi_pipeline synthetic")
        + _attr("PIM_DP_UFS_BARCODE", 0x101D, 0x1002, "IString", barcode)
        + _attr(
            "PIM_DP_SCANNED_IMAGES",
            0x101D,
            0x1003,
            "IDataObjectArray",
            "<Array>" + wsi + associated("LABELIMAGE", src.label) + associated("MACROIMAGE", src.macro) + "</Array>",
        )
        + "</DataObject>\n"
    )


def write_philips_tiff(src: SourcePixels, path: Path, *, tile: int = 256) -> Path:
    """Write `src` as a Philips TIFF: JPEG-tiled pyramid, Software 'Philips...', DPUfsImport XML on page 0."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mpp = src.spec.mpp or 0.25
    with tifffile.TiffWriter(path) as tw:
        for i, (img, d) in enumerate(zip(src.levels, src.spec.level_downsamples, strict=True)):
            first = {"description": philips_xml(src), "software": "Philips DP v1.0"} if i == 0 else {}
            tw.write(
                img,
                photometric="rgb",
                tile=(tile, tile),
                compression="jpeg",
                compressionargs={"level": JPEG_QUALITY},
                subsampling=(2, 2),
                subfiletype=int(i > 0),
                metadata=None,
                resolution=(1e4 / (mpp * d), 1e4 / (mpp * d)),
                resolutionunit="CENTIMETER",
                **first,
            )
    return path


# -- Hamamatsu NDPI ---------------------------------------------------------------------------------------------
# NDPI is TIFF-like but not TIFF: the header and every IFD end in a 64-bit next-IFD offset, and each IFD is
# followed by 4 bytes per entry holding the high halves of its values/offsets (all zero below 4 GiB). Each image is
# one JPEG strip; restart markers every `rst` MCUs make it tiled (tiles one MCU row high), and tag 65426 records
# where each restart interval starts so OpenSlide need not scan for them.
NDPI_FORMAT_FLAG, NDPI_SOURCELENS, NDPI_XOFFSET, NDPI_YOFFSET, NDPI_FOCAL_PLANE = 65420, 65421, 65422, 65423, 65424
NDPI_MCU_STARTS = 65426
_TIFF_TYPES = {
    "ascii": (2, "s", 1),
    "short": (3, "H", 2),
    "long": (4, "I", 4),
    "rational": (5, "I", 4),
    "slong": (9, "i", 4),
    "float": (11, "f", 4),
}


def _jpeg_with_restarts(img: np.ndarray, restart_mcus: int) -> bytes:
    """4:2:2 baseline JPEG (16 x 8 px MCUs) with a restart marker every `restart_mcus` MCUs (0: none).

    Not 4:2:0: OpenSlide 4.0's NDPI reader decodes a restart interval as one MCU row of tile height and fails
    ("found marker 0xd9 instead of RST0") on 16 px high MCUs; 4:2:2 and 4:4:4 (8 px high MCUs) read fine."""
    import cv2

    params = [
        cv2.IMWRITE_JPEG_QUALITY,
        JPEG_QUALITY,
        cv2.IMWRITE_JPEG_RST_INTERVAL,
        restart_mcus,
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422,
    ]
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(img[..., ::-1]), params)
    assert ok
    return buf.tobytes()


def _restart_offsets(data: bytes) -> list[int]:
    """Offsets (from the JPEG's start) where each restart interval's entropy-coded data begins."""
    i = 2
    while data[i + 1] != 0xDA:  # walk marker segments up to and including start-of-scan
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    starts, j = [i], i
    while (j := data.find(b"\xff", j)) != -1 and j < len(data) - 2:
        if 0xD0 <= data[j + 1] <= 0xD7:
            starts.append(j + 2)
        j += 2
    return starts


def _ndpi_entries(
    w: int, h: int, strip: tuple[int, int], lens: float, res_per_cm: float | None, mcu_starts: list[int] | None
) -> list[tuple[int, str, list]]:
    entries: list[tuple[int, str, list]] = [
        (256, "long", [w]),
        (257, "long", [h]),
        (258, "short", [8, 8, 8]),
        (259, "short", [7]),
        (262, "short", [6]),
        (271, "ascii", [b"Hamamatsu\0"]),
        (272, "ascii", [b"synthetic\0"]),
        (273, "long", [strip[0]]),
        (277, "short", [3]),
        (278, "long", [h]),
        (279, "long", [strip[1]]),
        (NDPI_FORMAT_FLAG, "long", [1]),
        (NDPI_SOURCELENS, "float", [lens]),
        (NDPI_XOFFSET, "slong", [0]),
        (NDPI_YOFFSET, "slong", [0]),
        (NDPI_FOCAL_PLANE, "slong", [0]),
    ]
    if res_per_cm is not None:
        num = round(res_per_cm * 1000)
        entries += [(282, "rational", [num, 1000]), (283, "rational", [num, 1000]), (296, "short", [3])]
    if mcu_starts:
        entries.append((NDPI_MCU_STARTS, "long", mcu_starts))
    return sorted(entries)


def write_ndpi(src: SourcePixels, path: Path, *, tile: int = 256) -> Path:
    """Write `src` as a Hamamatsu NDPI: one restart-marked JPEG strip per level, then the macro (lens -1).

    Level widths must be multiples of 16 and heights of 8 (the 4:2:2 MCU); `tile` a multiple of 16."""
    import struct

    mpp = src.spec.mpp or 0.25
    images = []
    for img, d in zip(src.levels, src.spec.level_downsamples, strict=True):
        h, w = img.shape[:2]
        if w % 16 or h % 8:
            raise ValueError(f"NDPI levels must be multiples of 16 x 8 px; level {w}x{h} is not")
        mcus = w // 16
        rst = min(tile // 16, mcus) if mcus % min(tile // 16, mcus) == 0 else mcus
        images.append((img, float(src.objective_power), 1e4 / (mpp * d), rst))
    images.append((src.macro, -1.0, None, 0))

    out = bytearray(b"II*\x00" + b"\0" * 8)
    next_ptr = 4  # where the (64-bit, little-endian) offset of the next IFD goes
    for img, lens, res, rst in images:
        data = _jpeg_with_restarts(img, rst)
        strip_at = len(out)
        out += data
        starts = _restart_offsets(data) if rst else None
        entries = _ndpi_entries(
            img.shape[1], img.shape[0], (strip_at, len(data)), lens, res, starts if starts and len(starts) > 1 else None
        )
        # out-of-line values first (they precede their IFD, as OpenSlide's offset heuristics expect)
        fields = []
        for tag, kind, values in entries:
            code, fmt, size = _TIFF_TYPES[kind]
            if kind == "ascii":
                payload, count = values[0], len(values[0])
            else:
                payload, count = struct.pack(f"<{len(values)}{fmt}", *values), len(values)
                count = count // 2 if kind == "rational" else count
            if len(payload) <= 4:
                fields.append((tag, code, count, payload.ljust(4, b"\0")))
            else:
                out += b"\0" * (len(out) % 2)
                fields.append((tag, code, count, struct.pack("<I", len(out))))
                out += payload
        out += b"\0" * (len(out) % 2)
        ifd_at = len(out)
        out[next_ptr : next_ptr + 4] = struct.pack("<I", ifd_at)
        out += struct.pack("<H", len(fields))
        for tag, code, count, value in fields:
            out += struct.pack("<HHI", tag, code, count) + value
        next_ptr = len(out)
        out += b"\0" * 8  # next-IFD offset, 64-bit in NDPI
        out += b"\0" * 4 * len(fields)  # high halves of each entry's value/offset
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(out))
    return path
