"""The cohort report (CSV + HTML from the per-slide sidecars) and exports to other tools' file layouts."""
