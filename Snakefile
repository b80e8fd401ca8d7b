# wsi_pipeline: whole-slide images in, tiles -> embeddings -> MIL models -> explanations out.
# This file is the table of contents; each stage lives in workflows/rules/. Run: snakemake --cores all
import os

# Configuration: workflows/config.yaml (override with --configfile my.yaml or --config key=value).

configfile: os.path.join(workflow.basedir, "workflows", "config.yaml")


include: "workflows/rules/common.smk"  # validated config, cohort table, output paths, settings snapshots
include: "workflows/rules/settings.smk"  # the settings snapshot each job reads, written once per scope
include: "workflows/rules/tile.smk"  # stage 1: tissue mask + tile grid + QC, one job per slide
include: "workflows/rules/encode.smk"  # stage 2: tile embeddings, one Zarr store per slide, sharded jobs
include: "workflows/rules/mil.smk"  # stage 3: attention-MIL per task and fold, summaries, heatmaps
include: "workflows/rules/explain.smk"  # stage 4: concept scores, zero-shot tasks, explained MIL tasks
include: "workflows/rules/report.smk"  # cohort report (CSV + HTML) and failure summary


rule all:
    input:
        rules.report.output,
        expand(PATHS.task_dir("{task}") / "summary.json", task=TASKS),
        PATHS.tasks_table if TASKS else [],
        explain_targets(),
        # the settings snapshots: a missing one (changed settings) reruns its jobs even without .snakemake/metadata
        [PATHS.settings_file(name) for name in SETTINGS],
        # slides whose file, content or MPP changed since they were tiled; concept sets and tasks made from feature
        # stores that changed since (a function: a cluster job's own parse of this file reads no store)
        stale_markers,
    default_target: True
