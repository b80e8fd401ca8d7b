# Cohort report: one row per slide (status, reason, backend, MPP, size, tissue area, tiles, time, thumbnail).


rule report:
    input:
        tiles=expand(PATHS.tile_sidecar("{slide_id}"), slide_id=SLIDES),
        encode=expand(FEATURES / "shards" / "{shard}.json", shard=ENCODE_SHARDS),
    output:
        csv=PATHS.report_csv,
        html=PATHS.report_html,
    log:
        RESULTS / "logs" / "report.log",
    run:
        report_job(input, log)  # in workflows/rules/common.smk


onsuccess:
    import pandas as pd

    from wsi_pipeline.report.report import failure_summary

    report_csv = PATHS.report_csv
    if report_csv.exists():
        print(f"\n{failure_summary(pd.read_csv(report_csv, keep_default_na=False))}")
