# Stage 1: open the slide, mask tissue, lay the tile grid, write tiles/{slide_id}.zarr + QC pictures.
# The sidecar tiles/{slide_id}.json is the rule's output and is written even for a bad slide (status "failed"),
# so one bad slide never stops the cohort. The job is `wsi-pipeline tile --record-failures`.


rule tile:
    input:
        slide_input,
    output:
        sidecar=PATHS.tile_sidecar("{slide_id}"),
    params:
        path=slide_path,
        mpp=slide_mpp_option,
        out=results_of_sidecar,
        config=str(RUN_CONFIG),  # a param, not an input: editing another section must not redo every slide
        # what the tiles depend on: a change here (or a replaced slide) redoes the slide and what follows
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
    conda:
        no_conda_env
    shell:
        # a shell job, not `run:`: Snakemake spawns a `run:` job as a whole new Snakemake process that parses the
        # workflow again (~2.5 s of CPU per slide measured on the demo); the command loads only what tiling uses
        wsi_command(
            "tile {params.path:q} --out {params.out:q} --slide-id {wildcards.slide_id} {params.mpp} "
            "--config {params.config:q} --record-failures > {log} 2>&1"
        )
