"""`llmdrop push`: upload a checkpoint directory to a Hugging Face Hub repo in one commit.

The model card (README.md) of an llmdrop export is regenerated from its ``llmdrop.json`` and the results found
beside it (llmdrop.formats.card.refresh_card) and uploaded from memory; the folder itself is only touched after the
commit succeeded (the refreshed card is then written back, atomically). A failed push changes nothing locally,
and running the same command again simply retries.

The token (``token=``, else ``HF_TOKEN``, else the cached ``hf auth login``) is passed to huggingface_hub and
nowhere else: it is never printed, logged, returned, or put into an error message.
"""

import os
from pathlib import Path

from llmdrop import __version__
from llmdrop.errors import LlmdropError
from llmdrop.files import atomic_write_text
from llmdrop.formats.card import CARD_FILE, refresh_card
from llmdrop.source.models import endpoint

DEFAULT_REVISION = "main"
LOGIN_HINT = (
    "not logged in to the Hugging Face Hub: run `hf auth login`, set HF_TOKEN=hf_... or pass --token "
    "(a token with write access, from https://huggingface.co/settings/tokens)"
)
# Never uploaded: version control, huggingface_hub's local cache, llmdrop's own temporary files.
_SKIP_DIRS = {".git", ".cache"}
_TMP_SUFFIXES = (".llmdrop-tmp",)


def repo_url(repo_id: str, revision: str | None = None, *, hub: str | None = None) -> str:
    url = f"{hub or endpoint()}/{repo_id}"
    return url if not revision or revision == DEFAULT_REVISION else f"{url}/tree/{revision}"


def check_checkpoint(folder) -> Path:
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise LlmdropError(f"{folder} does not exist")
    if not folder.is_dir():
        raise LlmdropError(f"{folder} is not a directory: push takes a checkpoint directory (e.g. from `llmdrop drop`)")
    if not (folder / "config.json").is_file():
        raise LlmdropError(f"{folder} is not a checkpoint (no config.json)")
    return folder


def check_repo_id(repo_id: str | None) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not repo_id or repo_id.count("/") != 1:
        raise LlmdropError(
            f"--repo-id must be NAMESPACE/NAME (your user or organization name, a slash, the repo "
            f"name), got {repo_id!r}"
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise LlmdropError(f"invalid --repo-id {repo_id!r}: {str(e).splitlines()[0]}") from None
    return repo_id


def folder_files(folder: Path) -> list[str]:
    """Every file to upload, as sorted POSIX paths relative to ``folder``."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for name in files:
            if not name.endswith(_TMP_SUFFIXES):
                out.append((Path(root) / name).relative_to(folder).as_posix())
    return sorted(out)


def resolve_token(token: str | None = None) -> str:
    """``token``, else HF_TOKEN, else the cached login (huggingface_hub.get_token); a clear error without one."""
    if token:
        return token
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise LlmdropError(LOGIN_HINT)
    return found


def _transport_errors() -> tuple[type, ...]:
    """Connection-level errors of the HTTP client huggingface_hub uses (httpx2 in 2.x, httpx in 1.x)."""
    import importlib

    found = []
    for name in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _hub_error(e: Exception, *, token: str, repo_id: str, hub: str) -> LlmdropError:
    """One line for a failed Hub call, with the token scrubbed out (huggingface_hub never puts it there anyway)."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(e, OfflineModeIsEnabled):
        msg = "HF_HUB_OFFLINE is set: unset it to push (or use --dry-run)"
    elif isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else None
        reason = f"{status} {e.response.reason_phrase}".strip() if e.response is not None else "error"
        server = (e.server_message or "").strip().splitlines()
        detail = f": {server[0]}" if server else ""
        if status == 401:
            msg = (
                f"the Hub rejected the token ({reason}{detail}); log in again with `hf auth login` or set "
                f"HF_TOKEN to a valid token"
            )
        elif status == 403:
            msg = f"no write access to {repo_id} ({reason}{detail}): use a token with write access to that namespace"
        elif status == 404:
            msg = f"{repo_id} not found ({reason}{detail})"
        elif status is not None and status >= 500:
            msg = f"the Hub failed ({reason}{detail}); nothing was changed locally: run the same command again"
        else:
            msg = f"the Hub refused the push ({reason}{detail})"
    elif isinstance(e, (*_transport_errors(), OSError)):
        msg = f"cannot reach {hub} ({type(e).__name__}: {e}); nothing was changed locally: run the same command again"
    else:  # e.g. ValueError: invalid README.md metadata, reported by the Hub's validation
        first = str(e).strip().splitlines()
        msg = f"push to {repo_id} failed: {' '.join(first[:3]) if first else type(e).__name__}"
    if token:
        msg = msg.replace(token, "***")
    return LlmdropError(msg)


def push(
    folder,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    token: str | None = None,
) -> dict:
    """Upload the checkpoint directory ``folder`` to the Hub model repo ``repo_id`` (NAMESPACE/NAME) in one commit.

    Creates the repo (``private`` only applies then) and the branch ``revision`` when missing. An llmdrop export's
    README.md is refreshed from its llmdrop.json first (uploaded from memory, written back after the commit).
    ``dry_run`` touches neither the network nor the folder and returns what the commit would be.

    Returns ``{"repo_id", "revision", "private", "url", "commit", "commit_url", "commit_message", "files"
    [{"path", "size"}], "total_bytes", "card", "dry_run"}``; ``card`` is refreshed / unchanged / created (README.md
    regenerated), kept (a README.md not written by llmdrop) or no-record (no llmdrop.json: README.md untouched).
    """
    folder = check_checkpoint(folder)
    repo_id = check_repo_id(repo_id)
    if revision is not None and not revision.strip():
        raise LlmdropError("--revision must not be empty")
    card_text, card_status = refresh_card(folder, repo_id=repo_id)
    card_bytes = card_text.encode("utf-8") if card_text is not None else None
    paths = folder_files(folder)
    if card_bytes is not None and CARD_FILE not in paths:
        paths = sorted([*paths, CARD_FILE])
    sizes = {
        p: len(card_bytes) if p == CARD_FILE and card_bytes is not None else (folder / p).stat().st_size for p in paths
    }
    message = commit_message or f"Upload {folder.name} with llmdrop {__version__}"
    hub = endpoint()
    result = {
        "repo_id": repo_id,
        "revision": revision or DEFAULT_REVISION,
        "private": private,
        "url": repo_url(repo_id, revision, hub=hub),
        "commit": None,
        "commit_url": None,
        "commit_message": message,
        "files": [{"path": p, "size": sizes[p]} for p in paths],
        "total_bytes": sum(sizes.values()),
        "card": card_status,
        "dry_run": dry_run,
    }
    if dry_run:
        return result

    token = resolve_token(token)
    from huggingface_hub import CommitOperationAdd, HfApi

    operations = [
        CommitOperationAdd(
            path_in_repo=p, path_or_fileobj=card_bytes if p == CARD_FILE and card_bytes is not None else folder / p
        )
        for p in paths
    ]
    api = HfApi(endpoint=hub, token=token, library_name="llmdrop", library_version=__version__)
    error = None
    try:
        api.create_repo(repo_id, private=True if private else None, exist_ok=True)  # None: the namespace's default
        if revision and revision != DEFAULT_REVISION:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(repo_id, operations, commit_message=message, revision=revision)
    except Exception as e:  # noqa: BLE001 - every Hub / network failure becomes one line without the token
        error = _hub_error(e, token=token, repo_id=repo_id, hub=hub)
    if error is not None:
        raise error  # outside the except block: no chained HTTP error (whose request holds the token) rides along
    result.update(commit=info.oid, commit_url=info.commit_url)
    if card_text is not None and card_status != "unchanged":
        try:
            atomic_write_text(folder / CARD_FILE, card_text)
        except OSError as e:
            raise LlmdropError(
                f"pushed {result['url']} (commit {info.oid}), but could not update {folder / CARD_FILE} locally: {e}"
            ) from None
    return result
