"""Synthetic whole-slide images with known tissue geometry, for tests, the demo cohort and benchmarks.

Slides are real TIFF files (Aperio SVS, generic pyramidal TIFF, flat strip TIFF, OME-TIFF) that OpenSlide
and/or TiffSlide open. Pixels are drawn tile by tile from the region geometry and a small pre-rendered texture
atlas, so a 100,000 x 80,000 px slide streams to disk with flat memory. Tiles entirely inside tissue or
background come from a pool of pre-encoded variants; only tiles crossing an edge, a pen mark or the border
are rendered and encoded one by one.

Regions can carry named tissue textures (``TEXTURES``: tumour, stroma, lymphocytes, necrosis, adipose, mucin),
recorded in the spec as ground truth (``SyntheticSpec.texture_at``); ``TEXTURE_CONCEPTS`` maps each to its concept
in ``workflows/concepts/tissue.yaml``.

Modules, in import order: ``scene`` (regions, pen marks, spec), ``textures`` (named tissue textures), ``render``
(atlases, tile painter), ``writers`` (encoders, file formats, :func:`write_synthetic_slide`), ``demo``
(:func:`write_demo_cohort`).
"""

from .demo import write_demo_cohort
from .render import ATLAS, BACKGROUND_RGB, NUCLEI_PER_UM2, POOL_BG, POOL_TISSUE, STAINS
from .scene import PEN_RGB, TISSUE, PenMark, Region, SyntheticSpec, default_regions
from .textures import TEXTURE_CONCEPTS, TEXTURES, render_texture
from .writers import APERIO_HEAD, FORMATS, write_synthetic_slide

__all__ = [
    "APERIO_HEAD",
    "ATLAS",
    "BACKGROUND_RGB",
    "FORMATS",
    "NUCLEI_PER_UM2",
    "PEN_RGB",
    "POOL_BG",
    "POOL_TISSUE",
    "STAINS",
    "TEXTURES",
    "TEXTURE_CONCEPTS",
    "TISSUE",
    "PenMark",
    "Region",
    "SyntheticSpec",
    "default_regions",
    "render_texture",
    "write_demo_cohort",
    "write_synthetic_slide",
]
