"""`qpipe publish`: upload a verified artifact's model folder to the Hugging Face hub, or copy it to a directory.

What is published is the deployable folder (model/ with its card) plus `qpipe_manifest.json`, a copy of the
run's manifest, so that `qpipe verify` works on the published copy too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from pipeline.artifact.local_paths import scrub
from pipeline.artifact.verify import (
    HUB_MANAGED,
    PUBLISHED_MANIFEST,
    Artifact,
    expected_files,
    open_artifact,
    require_verified,
    verify_artifact,
)
from pipeline.errors import PipelineError, StageFailed
from pipeline.run.files import atomic_directory, sha256_file
from pipeline.run.manifest import Manifest

HUB_URL = re.compile(r"^hf://(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[^@\s]+))?$")
TARGET_HINT = "use hf://org/name[@revision], file:///absolute/path or a directory"


@dataclass(frozen=True)
class Target:
    """Where to publish: a hub repository (and revision) or a local directory."""

    repo_id: str | None = None
    revision: str | None = None
    directory: Path | None = None

    def __str__(self) -> str:
        if self.repo_id:
            return f"hf://{self.repo_id}" + (f"@{self.revision}" if self.revision else "")
        return str(self.directory)


def parse_target(value: str) -> Target:
    """`hf://org/name[@revision]`, `file:///path` or a plain directory path."""
    if value.startswith("hf://"):
        match = HUB_URL.match(value)
        if not match:
            raise PipelineError(f"--to {value}: not a hub repository; {TARGET_HINT}")
        return Target(repo_id=match["repo"], revision=match["revision"])
    if value.startswith("file://"):
        url = urlparse(value)
        if url.netloc not in ("", "localhost") or not url.path:
            raise PipelineError(f"--to {value}: a file URL needs an absolute local path; {TARGET_HINT}")
        return Target(directory=Path(unquote(url.path)))
    if "://" in value:
        raise PipelineError(f"--to {value}: unsupported scheme; {TARGET_HINT}")
    return Target(directory=Path(value).expanduser())


def publish_files(artifact: Artifact) -> dict[str, Path]:
    """{path in the published folder: source file}: every verified model file (the manifest is written apart)."""
    return {rel: artifact.model_dir / rel for rel in sorted(expected_files(artifact.manifest))}


def public_manifest(manifest: Manifest) -> str:
    """The manifest as published: the run's, with absolute local paths shortened to their last component."""
    return json.dumps(scrub(manifest.model_dump(mode="json")), indent=2) + "\n"


def place_files(files: dict[str, Path], manifest: Manifest, folder: Path, link: bool) -> None:
    """Hard-link (where possible) or copy `files` into `folder`, and write the public manifest beside them."""
    (folder / PUBLISHED_MANIFEST).write_text(public_manifest(manifest), encoding="utf-8")
    for rel, source in files.items():
        dest = folder / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if link:
            try:
                os.link(source, dest)
                continue
            except OSError:
                pass
        shutil.copy2(source, dest)


def check_directory(directory: Path, replace: bool) -> None:
    """A directory target must be new, empty, or (with `replace`) an earlier publish holding nothing else."""
    if not directory.exists():
        return
    if not directory.is_dir():
        raise PipelineError(f"--to {directory}: exists and is not a directory; choose a new directory")
    if not any(directory.iterdir()):
        return
    if not (directory / PUBLISHED_MANIFEST).is_file():
        raise PipelineError(
            f"--to {directory}: exists and is not a qpipe-published folder; choose a new or empty directory"
        )
    if not replace:
        raise PipelineError(f"--to {directory}: holds an earlier publish; pass --replace to replace it")
    known = {*expected_files(open_artifact(directory).manifest), PUBLISHED_MANIFEST}
    foreign = sorted(
        rel for p in directory.rglob("*") if p.is_file() and (rel := str(p.relative_to(directory))) not in known
    )
    if foreign:
        more = f" and {len(foreign) - 1} more files" if len(foreign) > 1 else ""
        raise PipelineError(
            f"--to {directory}: holds {foreign[0]}{more} that no publish wrote; move them away or choose another "
            "directory"
        )


def make_shareable(folder: Path) -> None:
    """Give the folder the modes a plain copy would have (temp folders and files are created owner-only)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def to_directory(files: dict[str, Path], manifest: Manifest, directory: Path) -> str:
    """Copy into a temp folder beside `directory`, verify the copy, then rename it into place."""
    with atomic_directory(directory) as tmp:
        place_files(files, manifest, tmp, link=False)
        make_shareable(tmp)
        copy = verify_artifact(tmp)
        if copy.problems:
            raise StageFailed(f"publish: the copy in {directory} does not verify ({copy.problems[0]}); check the disk")
    return str(directory)


def to_hub(
    files: dict[str, Path], manifest: Manifest, target: Target, message: str, private: bool, staging_parent: Path
) -> str:
    """create_repo (and the branch), then upload_folder of a hard-linked staging folder: one commit, which also
    deletes every remote file this publish does not write (the hub keeps `.gitattributes`), so the repository
    holds exactly what the manifest lists; then the hub's file list is read back and compared with the staging
    folder (git blob ids, LFS sha256)."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if get_token() is None:
        raise PipelineError("publish: no Hugging Face token; set HF_TOKEN to a token with write access")
    api = HfApi()
    try:
        api.create_repo(target.repo_id, private=private, exist_ok=True)
        if target.revision:
            api.create_branch(target.repo_id, branch=target.revision, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".publish-", dir=staging_parent) as staging:
            place_files(files, manifest, Path(staging), link=True)
            commit = api.upload_folder(
                repo_id=target.repo_id,
                folder_path=staging,
                revision=target.revision,
                commit_message=message,
                delete_patterns="*",
            )
            problems = remote_problems(api, target, commit.oid, Path(staging), manifest)
    except OfflineModeIsEnabled:
        raise PipelineError("publish: HF_HUB_OFFLINE is set; unset it to upload to the hub") from None
    except HfHubHTTPError as exc:
        reason = str(exc).splitlines()[0]
        raise PipelineError(f"publish: the hub refused the upload to {target} ({reason}); check HF_TOKEN") from None
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise StageFailed(f"publish: {commit.commit_url} does not match what was uploaded: {problems[0]}{more}")
    return commit.commit_url


def git_blob_id(path: Path) -> str:
    """The git object id the hub reports for a file stored in git (not LFS): sha1 of a blob header and the bytes."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def remote_problems(api: Any, target: Target, revision: str, staging: Path, manifest: Manifest) -> list[str]:
    """What differs between the hub's tree at `revision` (the new commit) and the staged folder: missing, changed
    or extra files. LFS files are compared by sha256 (the manifest's, for model files), the rest by git blob id."""
    from huggingface_hub.hf_api import RepoFile

    digests = {rel: entry["sha256"] for rel, entry in expected_files(manifest).items()}
    remote = {
        entry.path: entry
        for entry in api.list_repo_tree(target.repo_id, revision=revision, recursive=True)
        if isinstance(entry, RepoFile)
    }
    problems = []
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        rel = path.relative_to(staging).as_posix()
        entry = remote.pop(rel, None)
        if entry is None:
            problems.append(f"{rel} is missing")
        elif entry.lfs is not None and entry.lfs.sha256 != (digests.get(rel) or sha256_file(path)):
            problems.append(f"{rel}: sha256 differs")
        elif entry.lfs is None and entry.blob_id != git_blob_id(path):
            problems.append(f"{rel}: content differs")
    problems += [f"{rel} is on the hub but not in the manifest" for rel in sorted(set(remote) - set(HUB_MANAGED))]
    return problems


def describe(files: dict[str, Path], manifest: Manifest) -> list[str]:
    """One line per file: size and path in the published folder, then the total."""
    sizes = {rel: path.stat().st_size for rel, path in files.items()}
    sizes[PUBLISHED_MANIFEST] = len(public_manifest(manifest).encode())
    lines = [f"  {size:>14,d}  {rel}" for rel, size in sizes.items()]
    return [*lines, f"  {sum(sizes.values()):>14,d}  total, {len(sizes)} files"]


def publish(
    path: Path, to: str, allow_failed_gate: bool, dry_run: bool, private: bool = True, replace: bool = False
) -> str:
    """Verify `path`, then publish it to `to`; returns where it went (or, on a dry run, what would go)."""
    target = parse_target(to)
    if target.directory is not None:
        check_directory(target.directory, replace)
    result = verify_artifact(path)
    require_verified(result, allow_failed_gate)
    files = publish_files(result.artifact)
    manifest = result.artifact.manifest
    if dry_run:
        header = f"dry run: would publish {path} (gate {manifest.gate}) to {target}:"
        return "\n".join([header, *describe(files, manifest), "nothing was uploaded or copied"])
    if target.directory is not None:
        return to_directory(files, manifest, target.directory)
    message = (
        f"qpipe {manifest.recipe} {manifest.recipe_hash} of {manifest.model.get('identity')} (gate {manifest.gate})"
    )
    return to_hub(files, manifest, target, message, private, result.artifact.model_dir.parent)
