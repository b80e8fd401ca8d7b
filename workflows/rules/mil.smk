# Stage 3: attention-MIL per task in mil.tasks. Per task: the training sheet (slides with features; the rest in
# excluded.csv), patient-level splits, one job per fold (x seed), then the summary, figures and attention
# heatmaps. Same code as the `wsi-pipeline mil-*` verbs.

MIL = RESULTS / "mil"
TASKS = [t.name for t in CFG.mil.tasks]
FOLDS = [f"{i:02d}" for i in range(CFG.mil.n_splits)]


def _task_params(wildcards):
    return {"task": CFG.mil.task(wildcards.task).model_dump(mode="json"),
            "train": CFG.mil.train.model_dump(mode="json")}


rule mil_sheet:
    input:
        encode=expand(FEATURES / "shards" / "{shard}.json", shard=ENCODE_SHARDS),
        config=RUN_CONFIG,
        samples=SAMPLE_SHEET,
    output:
        MIL / "{task}" / "sheet.csv",
    params:
        _task_params,
    log:
        RESULTS / "logs" / "mil" / "{task}_sheet.log",
    shell:
        WSI + " mil-sheet --config {input.config} --task {wildcards.task} > {log} 2>&1"


rule mil_splits:
    input:
        sheet=MIL / "{task}" / "sheet.csv",
        config=RUN_CONFIG,
    output:
        MIL / "{task}" / "splits.json",
    params:
        _task_params,
    log:
        RESULTS / "logs" / "mil" / "{task}_splits.log",
    shell:
        WSI + " mil-splits --config {input.config} --task {wildcards.task} > {log} 2>&1"


rule mil_train:
    input:
        sheet=MIL / "{task}" / "sheet.csv",
        splits=MIL / "{task}" / "splits.json",
        config=RUN_CONFIG,
    output:
        MIL / "{task}" / "fold{fold}" / "metrics.json",
    params:
        _task_params,
    log:
        RESULTS / "logs" / "mil" / "{task}_fold{fold}.log",
    resources:
        mem_mb=8000,
        runtime=240,
    shell:
        WSI + " mil-train --config {input.config} --task {wildcards.task} --fold {wildcards.fold} > {log} 2>&1"


rule mil_evaluate:
    input:
        folds=lambda wc: expand(MIL / wc.task / "fold{fold}" / "metrics.json", fold=FOLDS),
        config=RUN_CONFIG,
    output:
        summary=MIL / "{task}" / "summary.json",
        heatmaps=MIL / "{task}" / "heatmaps" / "index.json",
    log:
        RESULTS / "logs" / "mil" / "{task}_evaluate.log",
    shell:
        WSI + " mil-evaluate --config {input.config} --task {wildcards.task} > {log} 2>&1"
