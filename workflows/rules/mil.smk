# Stage 3: attention-MIL per task in mil.tasks. Per task: the training sheet (slides with features; the rest in
# excluded.csv), patient-level splits, one job per fold (x seed), then the summary, figures and attention
# heatmaps. Same code as the `wsi-pipeline mil-*` verbs.

FOLDS = [f"{i:02d}" for i in range(CFG.mil.n_splits)]



rule mil_sheet:
    input:
        encode=expand(FEATURES / "shards" / "{shard}.json", shard=ENCODE_SHARDS),
        concepts=task_sheet_inputs,
        settings=task_settings,
        samples=SAMPLE_SHEET,
        redo=task_redo_input,  # feature stores changed by hand since the sheet was written
    output:
        PATHS.task_dir("{task}") / "sheet.csv",
    log:
        RESULTS / "logs" / "mil" / "{task}_sheet.log",
    conda:
        no_conda_env
    shell:
        wsi_command("mil-sheet --config {input.settings} --task {wildcards.task}")


rule mil_splits:
    input:
        sheet=PATHS.task_dir("{task}") / "sheet.csv",
        settings=task_settings,
    output:
        PATHS.task_dir("{task}") / "splits.json",
    log:
        RESULTS / "logs" / "mil" / "{task}_splits.log",
    conda:
        no_conda_env
    shell:
        wsi_command("mil-splits --config {input.settings} --task {wildcards.task}")


rule mil_train:
    input:
        sheet=PATHS.task_dir("{task}") / "sheet.csv",
        splits=PATHS.task_dir("{task}") / "splits.json",
        settings=task_settings,
    output:
        PATHS.task_dir("{task}") / "fold{fold}" / "metrics.json",
    wildcard_constraints:
        task=one_of(TRAINED_TASKS),
    log:
        RESULTS / "logs" / "mil" / "{task}_fold{fold}.log",
    resources:
        mem_mb=8000,
        runtime=240,
    conda:
        no_conda_env
    shell:
        wsi_command("mil-train --config {input.settings} --task {wildcards.task} --fold {wildcards.fold}")


rule mil_evaluate:
    input:
        folds=lambda wc: expand(PATHS.task_dir(wc.task) / "fold{fold}" / "metrics.json", fold=FOLDS),
        settings=task_settings,
    output:
        summary=PATHS.task_dir("{task}") / "summary.json",
        heatmaps=PATHS.task_dir("{task}") / "heatmaps" / "index.json",
    wildcard_constraints:
        task=one_of(TRAINED_TASKS),
    log:
        RESULTS / "logs" / "mil" / "{task}_evaluate.log",
    conda:
        no_conda_env
    shell:
        wsi_command("mil-evaluate --config {input.settings} --task {wildcards.task}")


rule tasks_table:
    input:
        expand(PATHS.task_dir("{task}") / "summary.json", task=TASKS),
    output:
        PATHS.tasks_table,
    log:
        RESULTS / "logs" / "mil" / "tasks_table.log",
    run:
        tasks_table_job(log)  # in workflows/rules/common.smk
