"""Stage 1: tissue mask, tile grid at a target resolution, the tile table, QC pictures.

`config` (the `tiling:` and `tissue:` sections), `tissue` (the mask), `geometry` (tile size, level, grid),
`table` (the tile store), `qc` (pictures), `sidecar` (the per-slide status JSON), `stage` (one slide end to end)."""
