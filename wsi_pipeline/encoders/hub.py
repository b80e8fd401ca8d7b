"""Find a model's files: a local directory, or a pinned snapshot in the Hugging Face cache (offline by default)."""

from __future__ import annotations

from pathlib import Path

from wsi_pipeline.encoders.base import weight_files
from wsi_pipeline.errors import EncoderError, first_line


def download_hint(repo_id: str, revision: str | None) -> str:
    rev = f" --revision {revision}" if revision else ""
    return (
        f"if the repo is gated, accept its terms on https://huggingface.co/{repo_id} and log in (`hf auth login`), "
        f"then run `hf download {repo_id}{rev}` (or set encoder.local_files_only: false to download at run time), "
        "or set encoder.path to a local directory holding the model"
    )


def snapshot_revision(path: Path) -> str | None:
    """The commit hash of a directory inside the Hugging Face cache (…/snapshots/<commit>/), else None."""
    return path.name if path.parent.name == "snapshots" else None


def resolve_model_dir(
    *,
    path: str | None,
    repo_id: str | None,
    revision: str | None,
    cache_dir: str | None,
    local_files_only: bool,
    what: str,
    allow_patterns: list[str] | None = None,
    require_weights: bool = True,
    hint: str | None = None,
) -> tuple[Path, str | None]:
    """(directory, revision) of a model given either a local path or a hub repo id; one-line EncoderError if not.

    A local `path` wins. A hub repo is resolved with `snapshot_download`, which with `local_files_only=True`
    only looks in the cache and never touches the network.
    """
    if hint is None:
        local = "set encoder.path to a local directory holding the model"
        hint = download_hint(repo_id, revision) if repo_id else local
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise EncoderError(f"{what}: encoder.path {p} does not exist; {hint}")
        directory = p.resolve() if p.is_dir() else p
        rev = revision or snapshot_revision(directory)
    elif repo_id is not None:
        directory, rev = _from_hub(repo_id, revision, cache_dir, local_files_only, what, hint, allow_patterns)
    else:
        raise EncoderError(f"{what}: neither encoder.model_id nor encoder.path is set; set one of them")
    if require_weights and not weight_files(directory):
        raise EncoderError(f"{what}: no weight files (*.safetensors, *.bin, *.pt) in {directory}; {hint}")
    return directory, rev


def _from_hub(
    repo_id: str,
    revision: str | None,
    cache_dir: str | None,
    local_files_only: bool,
    what: str,
    hint: str,
    allow_patterns: list[str] | None,
) -> tuple[Path, str | None]:
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import snapshot_download

    where = f"{repo_id}@{revision or 'main'}"
    try:
        directory = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                allow_patterns=allow_patterns,
            )
        )
    except hf_errors.GatedRepoError as e:
        raise EncoderError(f"{what}: {where} is gated and this account has no access; {hint}") from e
    except hf_errors.RevisionNotFoundError as e:
        raise EncoderError(f"{what}: revision {revision} of {repo_id} does not exist; check encoder.revision") from e
    except hf_errors.RepositoryNotFoundError as e:
        raise EncoderError(f"{what}: {repo_id} not found on the Hub (or it is private); {hint}") from e
    except hf_errors.LocalEntryNotFoundError as e:
        cache = cache_dir or "the Hugging Face cache"
        raise EncoderError(
            f"{what}: weights for {where} are not in {cache} and downloads are off (local_files_only); {hint}"
        ) from e
    except (hf_errors.HfHubHTTPError, OSError, ValueError) as e:
        first = first_line(e)
        raise EncoderError(f"{what}: cannot fetch {where} ({first}); {hint}") from e
    return directory, snapshot_revision(directory) or revision
