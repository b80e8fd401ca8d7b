"""DICOM WSI frames whose JPEG data is YCbCr while the header says RGB, found from a few bytes of each instance.

Some converters write `PhotometricInterpretation = RGB` over baseline JPEG frames that carry a JFIF marker and
subsampled YCbCr data. OpenSlide (and wsidicom) trust the header, decode without colour conversion and hand back
Y, Cb, Cr in the R, G, B slots: white background reads ~(240, 128, 128), tissue turns cyan, the tissue mask and
every feature are wrong, and nothing fails. `find_mislabelled_ycbcr` compares each instance's header with what its
first JPEG frame says about itself (the rules libjpeg uses when nothing overrides it) and returns which pyramid
levels and associated images to convert back with `ycbcr_to_rgb`.

No DICOM library is needed at run time: only the file meta, the top-level data set up to Pixel Data (values are
skipped with seeks, not read) and the first frame's JPEG header are read, a few KB per instance.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np

log = logging.getLogger(__name__)

# Transfer syntaxes whose frames are ISO 10918-1 JPEG streams (baseline 8-bit, extended 12-bit).
JPEG_TRANSFER_SYNTAXES = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51")
# A JPEG header (markers up to start of scan) is well under this; an embedded ICC profile (APP2) can take ~60 KB.
JPEG_HEADER_BYTES = 256 * 1024
# Explicit VR little endian: these VRs have 2 reserved bytes and a 4-byte length (PS3.5 7.1.2), the rest 2 bytes.
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = (0xFFFE, 0xE000), (0xFFFE, 0xE00D), (0xFFFE, 0xE0DD)
_PIXEL_DATA = (0x7FE0, 0x0010)
_WANTED = {
    (0x0002, 0x0010): "transfer_syntax",
    (0x0008, 0x0008): "image_type",
    (0x0008, 0x0018): "sop_uid",
    (0x0020, 0x000E): "series_uid",
    (0x0028, 0x0004): "photometric",
    (0x0048, 0x0006): "columns",  # TotalPixelMatrixColumns (UL)
    (0x0048, 0x0007): "rows",  # TotalPixelMatrixRows (UL)
}
# ImageType's third value -> the associated image name OpenSlide gives that instance.
ASSOCIATED_NAMES = {"LABEL": "label", "OVERVIEW": "macro", "THUMBNAIL": "thumbnail"}
_warned: set[str] = set()


@dataclass(frozen=True)
class JpegColour:
    """What a JPEG stream's own markers say its three components hold, and which marker said so."""

    model: str | None  # "YCbCr", "RGB", or None when the stream does not say (libjpeg would only guess)
    evidence: str
    sampling: str = ""  # "4:2:0", "4:2:2", "4:4:4" or the factors as written


@dataclass(frozen=True)
class Instance:
    """The few attributes of one DICOM file that decide whether its frames are mislabelled."""

    path: Path
    series_uid: str
    sop_uid: str
    image_type: tuple[str, ...]
    photometric: str
    size: tuple[int, int] | None  # TotalPixelMatrixColumns, Rows
    colour: JpegColour | None  # None: not JPEG frames, or no frame found

    @property
    def mislabelled(self) -> bool:
        """The header says RGB, the JPEG frames say YCbCr: the reader gets YCbCr values as if they were RGB."""
        return self.photometric == "RGB" and self.colour is not None and self.colour.model == "YCbCr"


@dataclass(frozen=True)
class ColourCorrection:
    """Where reads must be converted from YCbCr to RGB, and the one line that records why (slide provenance)."""

    levels: frozenset[int]
    associated: frozenset[str]
    description: str


def ycbcr_to_rgb(arr: np.ndarray) -> np.ndarray:
    """Full-range BT.601 YCbCr (what JFIF specifies) in the R, G, B slots -> RGB; a 4th (alpha) channel is kept.

    Chroma was already upsampled by the JPEG decoder, before colour conversion as libjpeg always does, so converting
    afterwards gives what a correct decode gives (within +-1 of rounding)."""
    # OpenCV's YCrCb order is Y, Cr, Cb: swap the chroma planes (a contiguous copy cvtColor needs anyway)
    rgb = cv2.cvtColor(np.ascontiguousarray(arr[..., (0, 2, 1)]), cv2.COLOR_YCrCb2RGB)
    if arr.shape[2] == 3:
        return rgb
    out = np.empty_like(arr)
    out[..., :3] = rgb
    out[..., 3:] = arr[..., 3:]
    return out


def jpeg_colour(data: bytes) -> JpegColour:
    """Read a JPEG stream's markers up to start of scan and apply libjpeg's rules for a 3-component image: a JFIF
    APP0 marker means YCbCr; else an Adobe APP14 marker's transform flag (0 RGB, 1 YCbCr); else component ids
    1, 2, 3 mean YCbCr and 'R', 'G', 'B' mean RGB. Where libjpeg would merely assume YCbCr, say nothing."""
    if data[:2] != b"\xff\xd8":
        return JpegColour(None, "not a JPEG stream")
    jfif, adobe_transform, ids, sampling = False, None, None, ""
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker == 0xDA or marker == 0xD9:  # start of scan / end of image: the header is over
            break
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        segment = data[i + 4 : i + 2 + length]
        if marker == 0xE0 and segment[:5] == b"JFIF\0":
            jfif = True
        elif marker == 0xEE and segment[:5] == b"Adobe" and len(segment) >= 12:
            adobe_transform = segment[11]
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and len(segment) >= 6:  # SOFn
            n = segment[5]
            comps = [segment[6 + 3 * k : 9 + 3 * k] for k in range(n)]
            ids = tuple(c[0] for c in comps if len(c) == 3)
            sampling = _sampling_name([(c[1] >> 4, c[1] & 15) for c in comps if len(c) == 3])
        i += 2 + length
    if ids is None or len(ids) != 3:
        return JpegColour(None, "no 3-component frame header")
    if jfif:
        return JpegColour("YCbCr", "JFIF APP0 marker", sampling)
    if adobe_transform is not None:
        model = {0: "RGB", 1: "YCbCr"}.get(adobe_transform)
        return JpegColour(model, f"Adobe APP14 transform {adobe_transform}", sampling)
    if ids == (1, 2, 3):
        return JpegColour("YCbCr", "component ids 1, 2, 3", sampling)
    if ids == (82, 71, 66):
        return JpegColour("RGB", "component ids R, G, B", sampling)
    return JpegColour(None, f"component ids {ids} and no JFIF or Adobe marker", sampling)


def _sampling_name(factors: list[tuple[int, int]]) -> str:
    if len(factors) != 3:
        return ""
    names = {((2, 2), (1, 1), (1, 1)): "4:2:0", ((2, 1), (1, 1), (1, 1)): "4:2:2", ((1, 1), (1, 1), (1, 1)): "4:4:4"}
    return names.get((factors[0], factors[1], factors[2]), " ".join(f"{h}x{v}" for h, v in factors))


def read_instance(path: Path) -> Instance | None:
    """The attributes `Instance` needs, or None when `path` is not a DICOM file this parser reads (Part 10 with
    explicit VR little endian, as every encapsulated transfer syntax is)."""
    try:
        with path.open("rb") as f:
            if f.read(132)[128:] != b"DICM":
                return None
            found: dict[str, object] = {}
            reached_pixels = _walk(f, found)
            ts = str(found.get("transfer_syntax", ""))
            colour = None
            if reached_pixels and ts in JPEG_TRANSFER_SYNTAXES:
                frame = _first_fragment(f)
                colour = jpeg_colour(frame) if frame else None
    except (OSError, ValueError, struct.error):  # unreadable or not what it claims: no verdict, OpenSlide decides
        return None
    cols, rows = found.get("columns"), found.get("rows")
    image_type = str(found.get("image_type", ""))
    return Instance(
        path=path,
        series_uid=str(found.get("series_uid", "")),
        sop_uid=str(found.get("sop_uid", "")),
        image_type=tuple(v.strip() for v in image_type.split("\\")),
        photometric=str(found.get("photometric", "")).strip(),
        size=(int(cols), int(rows)) if isinstance(cols, int) and isinstance(rows, int) else None,
        colour=colour,
    )


def _element_header(f: BinaryIO) -> tuple[tuple[int, int], bytes, int] | None:
    """(tag, VR, length) of the next element; delimiters and items have no VR (b"")."""
    head = f.read(8)
    if len(head) < 8:
        return None
    group, elem = struct.unpack("<HH", head[:4])
    if group == 0xFFFE:
        return (group, elem), b"", struct.unpack("<I", head[4:])[0]
    vr = head[4:6]
    if vr in _LONG_VRS:
        return (group, elem), vr, struct.unpack("<I", f.read(4))[0]
    return (group, elem), vr, struct.unpack("<H", head[6:])[0]


def _walk(f: BinaryIO, found: dict[str, object], depth: int = 0) -> bool:
    """Read elements until Pixel Data (True, positioned at its first item) or the end (False), keeping `_WANTED`
    values at the top level and skipping everything else by seeking; nested items end at their delimiter."""
    if depth > 16:  # no real data set nests this deep: a corrupt file, not a reason to recurse further
        raise ValueError("sequences nested too deep")
    while (header := _element_header(f)) is not None:
        tag, vr, length = header
        if tag in (_ITEM_END, _SEQUENCE_END):
            return False
        if depth == 0 and tag[0] != 0x0002 and found.get("transfer_syntax") not in JPEG_TRANSFER_SYNTAXES:
            return False  # past the file meta: only JPEG data sets (explicit VR little endian) are worth parsing
        if tag == _PIXEL_DATA and depth == 0:
            return length == _UNDEFINED  # encapsulated (compressed) frames have undefined length
        if length == _UNDEFINED:  # a sequence or item whose end is a delimiter: walk through its contents
            _walk(f, found, depth + 1)
            continue
        name = _WANTED.get(tag) if depth == 0 else None
        if name is None:
            f.seek(length, 1)
        elif vr in (b"UL", b"US"):
            value = f.read(length)
            found[name] = struct.unpack("<I" if vr == b"UL" else "<H", value[: 4 if vr == b"UL" else 2])[0]
        else:
            found[name] = f.read(length).rstrip(b"\0 ").decode("ascii", "replace")
    return False


def _first_fragment(f: BinaryIO) -> bytes | None:
    """The start of the first frame: skip the basic offset table item, read the next item's first bytes."""
    for index in range(2):
        header = _element_header(f)
        if header is None or header[0] != _ITEM:
            return None
        if index == 0:
            f.seek(header[2], 1)
        else:
            return f.read(min(header[2], JPEG_HEADER_BYTES))
    return None


def find_mislabelled_ycbcr(
    opened: Path, properties: Mapping[str, str], level_dimensions: Sequence[tuple[int, int]]
) -> ColourCorrection | None:
    """Which levels and associated images of the DICOM slide OpenSlide opened from `opened` hold YCbCr frames
    under an RGB header (None when none do). OpenSlide builds the slide from the files in `opened`'s folder that
    share its series: the same files are checked, each level matched by its total pixel matrix size."""
    if properties.get("dicom.PhotometricInterpretation", "RGB").strip() != "RGB":
        return None  # the level-0 header is not RGB: OpenSlide converts YCbCr itself (cheap: no file read)
    series = properties.get("dicom.SeriesInstanceUID", "")
    instances = [
        inst
        for p in sorted(opened.parent.iterdir())
        if p.is_file() and (inst := read_instance(p)) is not None and inst.series_uid == series
    ]
    levels: set[int] = set()
    associated: set[str] = set()
    evidence: set[str] = set()
    for i, dims in enumerate(level_dimensions):
        volume = [x for x in instances if x.image_type[2:3] == ("VOLUME",) and x.size == tuple(dims)]
        if volume and all(x.mislabelled for x in volume):  # duplicates that disagree: leave OpenSlide's reading
            levels.add(i)
            evidence.update(_evidence(x) for x in volume)
    for kind, name in ASSOCIATED_NAMES.items():
        found = [x for x in instances if x.image_type[2:3] == (kind,)]
        if found and all(x.mislabelled for x in found):
            associated.add(name)
            evidence.update(_evidence(x) for x in found)
    if not levels and not associated:
        return None
    where = f"levels {', '.join(map(str, sorted(levels))) or 'none'}"
    if associated:
        where += f"; associated {', '.join(sorted(associated))}"
    description = (
        f"ycbcr-to-rgb: {' / '.join(sorted(evidence))} JPEG frames under PhotometricInterpretation RGB ({where})"
    )
    if str(opened.parent) not in _warned:  # once per slide (per process), however often it is reopened
        _warned.add(str(opened.parent))
        log.warning("%s: %s; converting every read from YCbCr to RGB", opened.parent, description)
    return ColourCorrection(frozenset(levels), frozenset(associated), description)


def _evidence(inst: Instance) -> str:
    colour = inst.colour
    assert colour is not None  # mislabelled instances have a verdict
    return f"{colour.evidence} ({colour.sampling} YCbCr)" if colour.sampling else colour.evidence
