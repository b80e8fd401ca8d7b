"""Stage 2: every tile of a slide through an image encoder into one sharded Zarr feature store per slide.

`config` (the `encode:` section), `engine` (one slide), `sharding` (a cohort over devices), `jobs` (workflow
shards), `loader` (tile batches and the encode loop), `store` (feature store layout and writer), `cohort` (reading
features back), `sidecar` (the per-slide status JSON)."""
