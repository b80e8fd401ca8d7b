# Stage 4 (explain:, optional): tile concept scores per concept set over the cohort's feature stores, MI-Zero
# zero-shot tasks (type: zero-shot in mil.tasks, written like trained tasks), and per trained task its concept
# explanation (attention-weighted concept profiles, concepts.csv, slides/*.json, an HTML page).

# Task lists, CONCEPT_SETS (set name -> entry of explain.concept_sets) and the helpers: common.smk


rule concept_scores:
    input:
        encode=expand(FEATURES / "shards" / "{shard}.json", shard=ENCODE_SHARDS),
        # the snapshot names the set's prompt hash: editing a prompt or template re-scores, the description does not
        settings=lambda wc: CONCEPT_SETTINGS[wc.concept_set],
        # feature stores changed outside the workflow since they were scored (their store_id)
        redo=concept_redo_input,
    output:
        PATHS.concept_summary(ENCODER, "{concept_set}"),
    params:
        entry=lambda wc: CONCEPT_SETS[wc.concept_set],
    wildcard_constraints:
        concept_set=one_of(CONCEPT_SETS),
    log:
        RESULTS / "logs" / "explain" / "concepts_{concept_set}.log",
    resources:
        mem_mb=8000,
    conda:
        no_conda_env
    shell:
        wsi_command("concepts --config {input.settings} --concept-set {params.entry:q}")


rule zero_shot:
    input:
        sheet=PATHS.task_dir("{task}") / "sheet.csv",
        splits=PATHS.task_dir("{task}") / "splits.json",
        settings=task_settings,
    output:
        summary=PATHS.task_dir("{task}") / "summary.json",
        heatmaps=PATHS.task_dir("{task}") / "heatmaps" / "index.json",
    wildcard_constraints:
        task=one_of(ZERO_SHOT_TASKS),
    log:
        RESULTS / "logs" / "mil" / "{task}_zero_shot.log",
    conda:
        no_conda_env
    shell:
        wsi_command("zero-shot --config {input.settings} --task {wildcards.task}")


rule explain_task:
    input:
        summary=PATHS.task_dir("{task}") / "summary.json",
        heatmaps=PATHS.task_dir("{task}") / "heatmaps" / "index.json",
        concepts=expand(PATHS.concept_summary(ENCODER, "{concept_set}"), concept_set=CONCEPT_SETS),
        settings=lambda wc: EXPLAIN_SETTINGS[wc.task],
    output:
        PATHS.task_explain_dir("{task}") / "index.html",
    log:
        RESULTS / "logs" / "explain" / "{task}.log",
    conda:
        no_conda_env
    shell:
        wsi_command("explain --config {input.settings} --task {wildcards.task}")
