"""Which encoders have a text tower, without importing torch: the config checks it before any job starts (a stage-4
config with an image-only encoder is refused at once, not after stages 1-3). Builders are "module:function" paths
imported by `encoders.text.build_text_encoder`, or callables registered from your own code."""

from __future__ import annotations

from typing import Any

TEXT_TOWERS: dict[str, Any] = {
    "conceptclip": "wsi_pipeline.encoders.text_conceptclip:build_conceptclip_text",
    "conceptclip-arch-random": "wsi_pipeline.encoders.text_random:build_conceptclip_arch_random_text",
    "open_clip": "wsi_pipeline.encoders.text_open_clip:build_open_clip_text",
    "whylesionclip": "wsi_pipeline.encoders.text_open_clip:build_whylesionclip_text",
}


def register_text_encoder(name: str, builder: Any) -> None:
    """Add (or replace) a text tower: `builder(cfg, device) -> TextEncoder`, or its "module:function" path."""
    TEXT_TOWERS[name] = builder


def available_text_encoders() -> list[str]:
    return sorted(TEXT_TOWERS)


def text_tower_builder(name: str) -> Any:
    """The registered builder of `name` (a callable or a "module:function" path), or None when it has no tower."""
    return TEXT_TOWERS.get(name)


def no_text_tower_message(name: str) -> str:
    return (
        f"encoder {name!r} has no text tower, so it cannot embed prompts; encoders with one: "
        f"{', '.join(available_text_encoders())} (encoder.name)"
    )
