"""A dataset given as a Hugging Face dataset id (`physical-intelligence/libero`) instead of a directory.

huggingface_hub does the work: `snapshot_download` into its cache (HF_HUB_CACHE, ~/.cache/huggingface/hub
by default), or, offline (HF_HUB_OFFLINE=1) or with `local_files_only`, the snapshot already there.
"""

from __future__ import annotations

import logging
import os
import pathlib
import re

log = logging.getLogger(__name__)

# owner/name: what a hub repo id looks like. A local relative path may look the same: an existing one wins.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(path: str | os.PathLike) -> bool:
    """`owner/name` that is not a local path."""
    return not pathlib.Path(path).exists() and _HUB_ID.fullmatch(str(path)) is not None


def offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it."""
    from huggingface_hub import constants  # noqa: PLC0415

    return bool(constants.HF_HUB_OFFLINE)


def cached(repo_id: str) -> pathlib.Path | None:
    """The local snapshot of hub dataset `repo_id` if the hub cache holds one; never the network."""
    from huggingface_hub import snapshot_download  # noqa: PLC0415
    from huggingface_hub.errors import LocalEntryNotFoundError  # noqa: PLC0415

    try:
        return pathlib.Path(snapshot_download(repo_id, repo_type="dataset", local_files_only=True))
    except LocalEntryNotFoundError:
        return None


def resolve(dataset: str | os.PathLike) -> pathlib.Path:
    """A local dataset directory for `dataset`: itself unless it is a hub id, else the id's snapshot,
    downloaded into the hub cache when it is not there yet (huggingface_hub's own progress bars)."""
    if not is_hub_id(dataset):
        return pathlib.Path(dataset)
    from huggingface_hub import snapshot_download  # noqa: PLC0415

    snapshot = cached(str(dataset))
    if snapshot is not None:
        return snapshot
    if offline():
        raise FileNotFoundError(f"Hugging Face dataset {dataset}: not in the hub cache, and HF_HUB_OFFLINE is set; "
                                f"run `hf download {dataset} --repo-type dataset` with network")
    log.info("downloading the dataset %s from the Hugging Face hub into its cache (once)", dataset)
    return pathlib.Path(snapshot_download(str(dataset), repo_type="dataset"))
