# Stage 1: open the slide, mask tissue, lay the tile grid, write tiles/{slide_id}.zarr + QC pictures.
# The sidecar tiles/{slide_id}.json is the rule's output and is written even for a bad slide (status "failed"),
# so one bad slide never stops the cohort. Same code as `wsi-pipeline tile`.


rule tile:
    input:
        slide_input,
    output:
        sidecar=RESULTS / "tiles" / "{slide_id}.json",
    params:
        path=slide_path,
        mpp=slide_mpp,
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
        import logging

        from wsi_pipeline.tiling.stage import tile_slide

        logging.basicConfig(filename=log[0], level=logging.INFO, force=True)
        result = tile_slide(
            params.path,
            RESULTS,
            slide_id=wildcards.slide_id,
            mpp=params.mpp,
            backend=params.backend,
            tiling=CFG.tiling,
            tissue=CFG.tissue,
        )
        logging.info("%s: %s (%s tiles) %s", wildcards.slide_id, result["status"], result["n_tiles"],
                     result.get("reason", ""))
