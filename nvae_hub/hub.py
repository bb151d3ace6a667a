"""Pretrained NVAEs: load one by folder, bundled name or Hub repo id; save one; push one to the Hugging Face Hub.

A pretrained model is a folder of three files: ``config.json`` (the ``NVAEConfig``), ``model.safetensors`` (the
weights) and ``README.md`` (the model card). ``NVAE.save_pretrained``/``push_to_hub``/``from_pretrained`` (from
``huggingface_hub``'s mixin) use the same files.
"""

from __future__ import annotations

import difflib
import tempfile
from pathlib import Path

import torch
from huggingface_hub import HfApi, constants, hf_hub_download, is_offline_mode
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
from huggingface_hub.utils import get_session, validate_repo_id

from .card import TrainingInfo
from .model import NVAE
from .weights import CONFIG_NAME, WEIGHTS_NAME, PretrainedLoadError, load_weights, read_config

BUNDLED_DIR = Path(__file__).parent / "pretrained"
BUNDLED_MODELS: dict[str, Path] = {
    folder.name: folder
    for folder in (sorted(BUNDLED_DIR.iterdir()) if BUNDLED_DIR.is_dir() else [])
    if (folder / CONFIG_NAME).is_file()
}
"""Models shipped with the package: name -> folder under ``nvae_hub/pretrained``."""
HUB_PROBE_TIMEOUT = 5.0
"""Seconds to wait for the Hub before treating it as unreachable (then only the Hub cache is searched)."""


def bundled_model(name: str) -> Path | None:
    """The folder of the bundled model called ``name``, in any case ("MNIST" is "mnist"), or None."""
    return {bundled.lower(): folder for bundled, folder in BUNDLED_MODELS.items()}.get(name.lower())


def load_pretrained(
    name_or_path: str | Path,
    revision: str | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> NVAE:
    """Load a pretrained NVAE, in eval mode, on ``device`` (default: the CPU).

    ``name_or_path`` is tried, in order, as a local folder, as the name of a bundled model (``BUNDLED_MODELS``, in
    any case) and as a Hugging Face Hub repo id (``"user/name"``), whose config.json and model.safetensors are
    downloaded into the Hub cache (``cache_dir``) at ``revision``. With ``local_files_only=True``,
    ``HF_HUB_OFFLINE=1`` or when the Hub cannot be reached (checked once, within ``HUB_PROBE_TIMEOUT`` seconds)
    only the cache is used. A name that is none of these fails at once, listing the bundled models. The weights
    are loaded strictly; any problem raises ``PretrainedLoadError`` naming the file.
    """
    config_file, weights_file = _locate(name_or_path, revision, cache_dir, local_files_only)
    model = NVAE(read_config(config_file))
    load_weights(model, weights_file)
    return model.to(device or "cpu").eval()


def save_pretrained(model: NVAE, directory: str | Path, training: TrainingInfo | None = None) -> Path:
    """Write ``model`` as config.json, model.safetensors and README.md (a model card, with ``training`` if
    given) into ``directory`` (created if needed). Returns the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model._save_pretrained(directory, training)
    return directory


def push_to_hub(
    model: NVAE,
    repo_id: str,
    training: TrainingInfo | None = None,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload NVAE",
) -> str:
    """Upload ``model`` (the files of ``save_pretrained``) to the Hub repo ``repo_id`` in one commit, creating the
    repo (and the branch ``revision``, if given) when needed. Returns the commit's URL."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pretrained(model, tmp, training)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=revision
        )
    return commit.commit_url


# ---------------------------------------------------------------------- finding the files
def _locate(
    name_or_path: str | Path, revision: str | None, cache_dir: str | Path | None, local_files_only: bool
) -> tuple[Path, Path]:
    """(config.json, model.safetensors) of a local folder, a bundled model or a Hub repo, in that order."""
    folder = Path(name_or_path)
    if folder.is_dir():
        return _files_in(folder)
    if isinstance(name_or_path, Path):
        raise PretrainedLoadError(f"no such folder: {folder}")
    bundled = bundled_model(name_or_path)
    if bundled is not None:
        return _files_in(bundled)
    return _download(name_or_path, revision, cache_dir, local_files_only)


def _files_in(folder: Path) -> tuple[Path, Path]:
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    missing = [file.name for file in (config_file, weights_file) if not file.is_file()]
    if missing:
        raise PretrainedLoadError(
            f"{folder} is not a pretrained NVAE folder: {' and '.join(missing)} missing (save_pretrained writes "
            f"{CONFIG_NAME} and {WEIGHTS_NAME})"
        )
    return config_file, weights_file


def _download(
    repo_id: str, revision: str | None, cache_dir: str | Path | None, local_files_only: bool
) -> tuple[Path, Path]:
    """Both files of a Hub repo, from the cache or downloaded (only from the cache when offline)."""
    not_local = f"{repo_id!r} is not a local folder, nor a bundled model ({_bundled_names()})"
    if "/" not in repo_id:  # every NVAE on the Hub has an owner: a bare name is a typo, not worth a Hub request
        close = difflib.get_close_matches(repo_id.lower(), list(BUNDLED_MODELS), n=1)
        did_you_mean = f"; did you mean {close[0]!r}?" if close else ""
        raise PretrainedLoadError(f"{not_local}, nor a Hub repo id ('user/name'){did_you_mean}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise PretrainedLoadError(f"{not_local}, nor a valid Hub repo id ('user/name'): {err}") from err
    offline = ""
    if local_files_only or is_offline_mode():
        why = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE is set"
        offline = f"; offline ({why}), so only the Hub cache was searched"
    elif (unreachable := _hub_unreachable()) is not None:
        # huggingface_hub would retry for about 20 seconds; the cache is all there is.
        local_files_only = True
        offline = f"; the Hub ({constants.ENDPOINT}) cannot be reached ({unreachable}), so only its cache was searched"
    files = []
    for filename in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            file = hf_hub_download(
                repo_id, filename, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
            )
        except (HfHubHTTPError, LocalEntryNotFoundError) as err:
            at = f" at revision {revision!r}" if revision else ""
            if offline and isinstance(err, LocalEntryNotFoundError):
                reason = "not in the cache"
            else:
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise PretrainedLoadError(
                f"could not get {filename} of Hub repo {repo_id!r}{at}{offline}: {reason} ({not_local})"
            ) from err
        files.append(Path(file))
    return files[0], files[1]


def _hub_unreachable() -> str | None:
    """Why the Hub cannot be reached (one request, with huggingface_hub's own session and proxies), or None if it
    answers at all."""
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT)
    except Exception as err:  # any failure to get an answer means: offline
        return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    return None


def _bundled_names() -> str:
    return "bundled: " + ", ".join(BUNDLED_MODELS) if BUNDLED_MODELS else "none are bundled"
