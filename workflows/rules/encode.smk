# Stage 2: every tile of every slide through the encoder into features/{encoder}/{slide_id}.zarr.
# The cohort is split into encode.jobs shards balanced by tile count; each job loads the model once per device
# (encode.gpus_per_job GPUs, locked so that `--resources gpu=N` jobs never share one) and skips slides whose
# store is already complete. Per-slide status: features/{encoder}/{slide_id}.json. Same code as
# `wsi-pipeline encode-shard` (`wsi-pipeline encode` does one slide).


rule encode:
    input:
        tiles=expand(PATHS.tile_sidecar("{slide_id}"), slide_id=SLIDES),
        settings=ENCODE_SETTINGS,
    output:
        summary=FEATURES / "shards" / "{shard}.json",
    params:
        shard=lambda wc: int(wc.shard.split("-of-")[0]),
        shards=CFG.encode.jobs,
    log:
        RESULTS / "logs" / "encode" / "{shard}.log",
    threads: (4 if CFG.encode.num_workers == "auto" else CFG.encode.num_workers) + 1  # auto: at most 4 readers
    resources:
        gpu=CFG.encode.gpus_per_job if USE_GPU else 0,
        mem_mb=16000,
        runtime=720,
    conda:
        no_conda_env
    shell:
        wsi_command(
            "encode-shard --config {input.settings} --shard {params.shard} --shards {params.shards} "
            "--out {output.summary}"
        )
