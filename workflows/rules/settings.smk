# The settings snapshots every job reads: RESULTS/settings/{scope}-{digest}.yaml, one per scope (tile, encode,
# concepts-SET, task-TASK, explain-TASK), written once and never rewritten; the SETTINGS table is built in
# common.smk. Each is a target of rule all, so a changed setting (a new snapshot) redoes its jobs even where
# .snakemake/metadata is gone (a moved, copied or restored results folder).


rule run_settings:
    output:
        PATHS.settings_dir / "{snapshot}.yaml",
    params:
        text=lambda wc: SETTINGS[wc.snapshot],
    wildcard_constraints:
        snapshot=one_of(SETTINGS),
    log:
        RESULTS / "logs" / "settings" / "{snapshot}.log",
    localrule: True
    conda:
        no_conda_env
    shell:
        wsi_command("write-settings --out {output:q} --text {params.text:q}")


rule redo_marker:
    output:
        "{folder}/{digest}",
    wildcard_constraints:
        folder=REDO_FOLDERS,
        digest="[0-9a-f]{12}",
    log:
        "{folder}/{digest}.log",
    localrule: True
    conda:
        no_conda_env
    shell:
        # the folder's earlier markers (and their logs) go, so that going back to earlier inputs redoes the job too
        'find "$(dirname {output:q})" -maxdepth 1 -type f -regextype posix-extended -regex ".*/[0-9a-f]{{12}}([.]log)?" '
        '! -name "$(basename {output:q})" ! -name "$(basename {log:q})" -delete > {log:q} 2>&1; '
        "echo redo > {output:q}"


onstart:
    # a real run (never a dry run): drop the superseded snapshots of these scopes, so that returning to earlier
    # settings writes their snapshot anew and redoes the work; then record the whole config (no job reads it)
    run_settings.prune_superseded(PATHS.settings_dir, SETTINGS)
    write_run_config(CFG, PATHS.run_config)
