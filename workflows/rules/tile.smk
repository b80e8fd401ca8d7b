# Stage 1: open the slide, mask tissue, lay the tile grid, write tiles/{slide_id}.zarr + QC pictures.
# The sidecar tiles/{slide_id}.json is the rule's output and is written even for a bad slide (status "failed"),
# so one bad slide never stops the cohort. Same code as `wsi-pipeline tile`.


rule tile:
    input:
        slide_input,
    output:
        sidecar=PATHS.tile_sidecar("{slide_id}"),
    params:
        path=slide_path,
        mpp=slide_mpp,
        fingerprint=slide_fingerprint,
        tiling=CFG.tiling.model_dump(),
        tissue=CFG.tissue.model_dump(),
        backend=CFG.backend,
    log:
        RESULTS / "logs" / "tile" / "{slide_id}.log",
    resources:
        mem_mb=4000,
        runtime=60,
    threads: 1
    run:
        tile_job(wildcards, params, log)  # in workflows/rules/common.smk
