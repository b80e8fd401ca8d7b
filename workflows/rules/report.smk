# Cohort report: one row per slide (status, reason, backend, MPP, size, tissue area, tiles, time, thumbnail).


rule report:
    input:
        tiles=expand(RESULTS / "tiles" / "{slide_id}.json", slide_id=SLIDES),
        encode=expand(FEATURES / "shards" / "{shard}.json", shard=ENCODE_SHARDS),
    output:
        csv=RESULTS / "report.csv",
        html=RESULTS / "report.html",
    run:
        from wsi_pipeline.report.report import build_report, failure_summary

        table = build_report(input.tiles, RESULTS, encoder=ENCODER)
        print(failure_summary(table))


onsuccess:
    import pandas as pd

    from wsi_pipeline.report.report import failure_summary

    report_csv = RESULTS / "report.csv"
    if report_csv.exists():
        print("\n" + failure_summary(pd.read_csv(report_csv, keep_default_na=False)))
