# Stage 1: open the slide, mask tissue, lay the tile grid, write tiles/{slide_id}.zarr + QC pictures.
# The sidecar tiles/{slide_id}.json is the rule's output and is written even for a bad slide (status "failed"),
# so one bad slide never stops the cohort. The job is `wsi-pipeline tile --record-failures`.


rule tile:
    input:
        slide=slide_input,
        settings=TILE_SETTINGS,  # backend, tiling and tissue sections: a change redoes every slide
        redo=tile_redo_input,  # the slide's file, content or MPP differ from what its sidecar records
    output:
        sidecar=PATHS.tile_sidecar("{slide_id}"),
    params:
        path=lambda wc: slide_path(wc.slide_id),
        mpp=slide_mpp_option,
        out=results_of_sidecar,
        # the slide's content: a slide replaced under the same name (even with its old date) redoes it
        fingerprint=slide_fingerprint,
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
            "--config {input.settings:q} --record-failures"
        )
