"""Stage 3: attention-MIL on tile features — `config` (tasks, training), `bags`, `splits`, `models` (registry),
`losses`, `engine` (one model's training loop), `train` (a task's folds), `evaluate` (its summary), `workflow`
(the workflow's per-task jobs), `heatmaps`, `bench` (classic MIL benchmark)."""
