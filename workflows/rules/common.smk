# Shared by every rule: the validated configuration (pydantic, one error line per problem) and the cohort table.
import functools
import hashlib
import json
import re
import sys
from pathlib import Path

from wsi_pipeline import run_settings
from wsi_pipeline.config import load_config, write_run_config
from wsi_pipeline.io.small_zarr import read_group_attributes
from wsi_pipeline.devices import cuda_present
from wsi_pipeline.jobguard import export_parent_pid
from wsi_pipeline.layout import ResultsLayout
from wsi_pipeline.slide.fingerprint import current_fingerprint
from wsi_pipeline.slide.ids import SLIDE_ID_PATTERN

CFG = load_config(config)
# A relative encoder.path that is not under the working directory is read from the repo (the shipped demo model
# when Snakemake runs elsewhere with --snakefile). Jobs get absolute paths through their settings snapshots, so the
# same files name the same snapshot from any working directory.
if CFG.encoder.path:
    model_dir = Path(CFG.encoder.path).expanduser()
    if not model_dir.exists() and (Path(workflow.basedir) / model_dir).exists():
        model_dir = Path(workflow.basedir) / model_dir
    CFG.encoder.path = str(model_dir.absolute())
if CFG.samples and not any(c in CFG.samples for c in "*?["):  # a sheet, or one file: not a glob
    CFG.samples = str(Path(CFG.samples).expanduser().absolute())
COHORT = CFG.cohort()
SLIDES = list(COHORT.index)
# A changed sheet (labels, outcomes) must redo what reads it: stage 3 takes the sheet as an input.
SAMPLE_SHEET = [CFG.samples] if CFG.samples.lower().endswith(".csv") else []
RESULTS = Path(CFG.results)
PATHS = ResultsLayout(RESULTS)  # every results path: wsi_pipeline/layout.py
# Shell jobs run the CLI with the interpreter running Snakemake (the project's venv), whatever PATH says.
WSI = f"{sys.executable} -m wsi_pipeline"
# Jobs watch this process and stop when it is gone: kill -9 of Snakemake must not leave them running.
export_parent_pid()


def wsi_command(args):
    """A shell rule's command: the CLI (WSI) with `args` (their {input}/{log}/... placeholders kept), its output in
    the job's log; a failed job also prints the log's last line (the command's one-line reason) on the console, so
    `Error in rule ...` is never the only thing a user sees."""
    failed = 'echo "failed ({wildcards}): $(tail -n 1 {log:q}) (log: {log})" >&2'
    return f"{WSI} {args} > {{log:q}} 2>&1 || {{{{ status=$?; {failed}; exit $status; }}}}"


def no_conda_env(wildcards):
    """The shell rules' `conda:`. Their software is the wsi-pipeline package in the interpreter that runs Snakemake
    (WSI: the README's .venv with its pinned torch), so there is no per-rule environment to build, with or without
    `--sdm conda`: None tells Snakemake to use none, and `snakemake --lint` sees the choice was made."""
    return None


wildcard_constraints:
    slide_id=SLIDE_ID_PATTERN,


def slide_path(slide_id):
    return COHORT.loc[slide_id, "path"]


def slide_input(wildcards):
    """The slide as input when it exists; a missing file is still tiled, so its failure lands in the report."""
    path = Path(slide_path(wildcards.slide_id))
    return [str(path)] if path.exists() else []


@functools.cache
def recorded_tiling(slide_id):
    """The slide's tile sidecar as written (what it was tiled from); {} before its first tiling."""
    try:
        return json.loads(PATHS.tile_sidecar(slide_id).read_text())
    except (OSError, ValueError):
        return {}


@functools.cache
def slide_identity(slide_id):
    """What a slide's tiles are made from, besides the tile settings: its file, content fingerprint (a stat when the
    file is unchanged, a ~110 KB sampled read otherwise) and the sheet's MPP override."""
    recorded = recorded_tiling(slide_id).get("slide_fingerprint")
    mpp = COHORT.loc[slide_id, "mpp"]
    return {
        "path": str(slide_path(slide_id)),
        "fingerprint": current_fingerprint(slide_path(slide_id), recorded),
        "mpp_override": None if mpp != mpp else float(mpp),  # NaN: not given
    }


def slide_fingerprint(wildcards):
    """The slide's content fingerprint (wsi_pipeline.slide.fingerprint) as a param of the tile rule: a slide
    replaced under the same name, even with its old date (cp -p, rsync -a, a restore), changes it, and Snakemake
    redoes the slide and everything after it. Unchanged files cost a stat, not a read."""
    return slide_identity(wildcards.slide_id)["fingerprint"] or "missing"


def tile_markers(slide_id):
    """tiles/.redo/{slide}/: the slide's redo marker is due when its sidecar was made from another file, content or
    MPP than the sheet now gives, so the slide is retiled even where .snakemake/metadata is gone (the fingerprint
    param above needs it)."""
    folder = PATHS.tiles_dir / ".redo" / slide_id
    return folder, [redo_marker(folder, slide_identity(slide_id))] if tile_is_stale(slide_id) else []


def tile_is_stale(slide_id):
    recorded = recorded_tiling(slide_id)
    if not recorded:
        return False
    now = slide_identity(slide_id)
    was = {
        "path": recorded.get("path"),
        "fingerprint": (recorded.get("slide_fingerprint") or {}).get("fingerprint"),
        "mpp_override": recorded.get("mpp_override"),
    }
    return was != now


def tile_redo_input(wildcards):
    return redo_input(*tile_markers(wildcards.slide_id))


def stale_tile_markers():
    """The redo markers of every slide to retile because its recorded identity is not the sheet's."""
    return [m for sid in SLIDES for m in tile_markers(sid)[1]]


def results_of_sidecar(wildcards, output):
    """The results folder a tile job writes into, from its sidecar's path (RESULTS/tiles/{slide_id}.json)."""
    return str(Path(output.sidecar).parent.parent)


def slide_mpp_option(wildcards):
    """`--mpp X` for the tile command where the sample sheet gives the slide's MPP, else nothing (metadata)."""
    mpp = COHORT.loc[wildcards.slide_id, "mpp"]
    return "" if mpp != mpp else f"--mpp {float(mpp)!r}"  # NaN: not given

ENCODER = CFG.encoder.name
FEATURES = PATHS.feature_dir(ENCODER)
ENCODE_SHARDS = [f"{i}-of-{CFG.encode.jobs}" for i in range(CFG.encode.jobs)]


def _uses_gpu():
    if CFG.encode.device == "cpu":
        return False
    if CFG.encode.device == "auto":  # decided where the DAG is built: set encode.device: cuda on a cluster
        return cuda_present()  # without importing torch: every job re-reads this file
    return True


USE_GPU = _uses_gpu()


def concept_set_entries():
    """explain.concept_sets as {set name: entry} (a shipped name or a YAML path); empty without explain:."""
    if CFG.explain is None:
        return {}
    from wsi_pipeline.explain.concepts import load_concept_sets

    sets = load_concept_sets(CFG.explain.concept_sets)
    return {s.name: entry for s, entry in zip(sets, CFG.explain.concept_sets)}


def concept_set_hash(name):
    from wsi_pipeline.explain.concepts import load_concept_set, prompt_set_hash

    return prompt_set_hash(load_concept_set(CONCEPT_SETS[name]))


TASKS = [t.name for t in CFG.mil.tasks]
TRAINED_TASKS = [t.name for t in CFG.mil.tasks if t.type != "zero-shot"]  # stage 3 trains these
ZERO_SHOT_TASKS = [t.name for t in CFG.mil.tasks if t.type == "zero-shot"]  # stage 4 scores these (explain.smk)
# name -> entry of explain.concept_sets (a shipped name or a YAML path); outputs are keyed by the set's name
CONCEPT_SETS = concept_set_entries()


def one_of(names):
    """A wildcard pattern matching exactly these names (none: a pattern that matches nothing)."""
    return "|".join(re.escape(n) for n in names) or "(?!)"


def task_sheet_inputs(wildcards):
    """A concept-bottleneck task (features: concepts:<set>) needs its concept set scored before its sheet."""
    concept_set = CFG.mil.task(wildcards.task).concept_features
    return [PATHS.concept_summary(ENCODER, concept_set)] if concept_set else []


@functools.cache
def feature_store_id(slide_id):
    """The slide's feature store's `store_id` (new at every write), read once per parse: every concept set and
    task compares against it."""
    return read_group_attributes(PATHS.feature_store(ENCODER, slide_id)).get("store_id")


def concepts_outdated(concept_set):
    """Slides whose concept scores were computed from another feature store than the one there now (re-encoded or
    repaired outside the workflow), compared by the stores' own records: Snakemake's dates cannot see it."""
    outdated = []
    for sid in SLIDES:
        scores = read_group_attributes(PATHS.concept_store(ENCODER, concept_set, sid))
        if scores and scores.get("feature_store_id") != feature_store_id(sid):
            outdated.append(sid)
    return outdated


def redo_marker(folder, what):
    """{folder}/{digest of what}: a marker naming what must be redone (a slide's identity, slide -> the feature
    store there now). A due marker is a target of the default run and an input of the job; once written it stays an
    input, so a redone job is not redone again when the metadata lists it (writing it removes the earlier ones)."""
    return Path(folder) / hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


@functools.cache
def stale_concept_markers(concept_set):
    outdated = {sid: feature_store_id(sid) for sid in concepts_outdated(concept_set)}
    return [redo_marker(PATHS.concept_dir(ENCODER, concept_set) / ".redo", outdated)] if outdated else []


@functools.cache
def stale_task_markers(task):
    """A task whose sheet was written when some of its feature stores were other stores than now (re-encoded or
    repaired by hand): its sheet, splits, folds and summary are redone."""
    try:
        recorded = json.loads(PATHS.task_features_record(task).read_text()).get("stores") or {}
    except (OSError, ValueError):
        return []
    if CFG.mil.task(task).concept_features:
        return []  # a concept bottleneck follows its concept scores (cohort.csv), redone as above
    outdated = {sid: feature_store_id(sid) for sid, was in recorded.items() if feature_store_id(sid) != was}
    return [redo_marker(PATHS.task_dir(task) / ".redo", outdated)] if outdated else []


def redo_input(folder, due):
    """The due marker, else the one left in `folder` by the last redo (markers are 12-digit digests; logs beside)."""
    kept = [p for p in sorted(Path(folder).glob("*")) if re.fullmatch("[0-9a-f]{12}", p.name)]
    return due or kept[-1:]


def concept_redo_input(wildcards):
    folder = PATHS.concept_dir(ENCODER, wildcards.concept_set) / ".redo"
    return redo_input(folder, stale_concept_markers(wildcards.concept_set))


def task_redo_input(wildcards):
    return redo_input(PATHS.task_dir(wildcards.task) / ".redo", stale_task_markers(wildcards.task))


def stale_markers(wildcards):
    """Every redo marker due, for the default target: slides to retile, concept sets and tasks to redo for changed stores."""
    return (
        stale_tile_markers()
        + [m for name in CONCEPT_SETS for m in stale_concept_markers(name)]
        + [m for task in TASKS for m in stale_task_markers(task)]
    )


# where redo markers live: per concept set, per task, and per slide under tiles/.redo/
REDO_FOLDERS = "|".join(
    [one_of(str(PATHS.concept_dir(ENCODER, name) / ".redo") for name in CONCEPT_SETS)]
    + [one_of(str(PATHS.task_dir(t) / ".redo") for t in TASKS)]
    + [f"{re.escape(str(PATHS.tiles_dir / '.redo'))}/{SLIDE_ID_PATTERN}"]
)


def explain_targets():
    """The default target's stage-4 part, with explain configured: every concept set scored, every task explained (a
    zero-shot task by the tiles its class scores came from, a trained one by its attention)."""
    if CFG.explain is None:
        return []
    return expand(PATHS.concept_summary(ENCODER, "{concept_set}"), concept_set=CONCEPT_SETS) + expand(
        PATHS.task_explain_dir("{task}") / "index.html", task=TASKS
    )


def tasks_table_job(log):
    """mil/tasks.csv: every task's headline metric side by side (trained, zero-shot, concept bottleneck)."""
    from wsi_pipeline.report.tasks import write_task_table

    table = write_task_table(RESULTS, TASKS)
    Path(log[0]).write_text(table.to_string(index=False) + "\n")
    print(table.to_string(index=False))


def report_job(input, log):
    """The report rule's job: report.csv/html from the tile sidecars, the failure summary printed and logged."""
    from wsi_pipeline.report.report import build_report, failure_summary

    summary = failure_summary(build_report(input.tiles, RESULTS, encoder=ENCODER))
    Path(log[0]).write_text(f"{summary}\n")
    print(summary)

# The settings each job reads: per scope a snapshot RESULTS/settings/{scope}-{digest}.yaml holding only what that
# scope uses, written once by the run_settings rule (a dry run writes nothing; a later invocation with other settings
# writes other files and never changes what a running job reads) and an input of the scope's jobs, so a change redoes
# exactly the jobs that use it, with or without .snakemake/metadata. wsi_pipeline/run_settings.py says why.
SETTINGS = {}  # snapshot name ({scope}-{digest}) -> its text


def settings_snapshot(scope, data, identity=None):
    text = run_settings.settings_text(scope, data, identity)
    name = run_settings.settings_name(scope, text)
    SETTINGS[name] = text
    return PATHS.settings_file(name)


TILE_SETTINGS = settings_snapshot("tile", run_settings.tile_settings(CFG))
ENCODE_SETTINGS = settings_snapshot("encode", run_settings.encode_settings(CFG))
CONCEPT_SETTINGS = {
    name: settings_snapshot(
        f"concepts-{name}", run_settings.concept_settings(CFG, entry), {"prompt_hash": concept_set_hash(name)}
    )
    for name, entry in CONCEPT_SETS.items()
}
TASK_SETTINGS = {t: settings_snapshot(f"task-{t}", run_settings.task_settings(CFG, t)) for t in TASKS}
EXPLAIN_SETTINGS = (
    {t: settings_snapshot(f"explain-{t}", run_settings.explain_settings(CFG, t)) for t in TASKS} if CFG.explain else {}
)


def task_settings(wildcards):
    return TASK_SETTINGS[wildcards.task]
