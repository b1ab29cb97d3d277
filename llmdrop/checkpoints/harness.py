"""`llmdrop eval --tasks`: EleutherAI's lm-evaluation-harness (``lm-eval`` 0.4.x, extra ``llmdrop[eval]``) on a model
as llmdrop loads it.

The model goes to the harness already built (``HFLM(pretrained=model, tokenizer=...)``), so whatever llmdrop loads
(the builtin GGUF, remote-code and nemotron-nas exports, healed or quantized checkpoints) is what the harness scores.
Two tasks ship inside the package (``data/tasks``: ``llmdrop_mc``, ``llmdrop_capitals``) with their data, and are
found without ``--include-path``. The run is offline (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``) unless the user
set those variables: a task whose data is neither local nor cached fails with one line instead of a stack of retries.
"""

import difflib
import logging
import os
from contextlib import contextmanager
from pathlib import Path

from llmdrop.errors import LlmdropError
from llmdrop.files import DATA_DIR
from llmdrop.source.models import LoadedModel

TASKS_DIR = DATA_DIR / "tasks"
BUNDLED_TASKS = ("llmdrop_capitals", "llmdrop_mc")
INSTALL = "pip install 'llmdrop[eval]'"
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def parse_tasks(tasks: str | list[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b"]`` -> ``["a", "b"]`` (order kept, duplicates and blanks dropped)."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = list(dict.fromkeys(n.strip() for n in names if n and n.strip()))
    if not names:
        raise LlmdropError("--tasks needs at least one task name (e.g. --tasks llmdrop_mc,llmdrop_capitals)")
    return names


def check_limit(limit):
    """lm-eval's --limit: a count of documents per task (>= 1) or a fraction of each task (0 < limit < 1)."""
    if limit is None:
        return None
    if not limit > 0:
        raise LlmdropError(f"--limit must be a number of documents (>= 1) or a fraction in (0, 1), got {limit}")
    if limit >= 1:
        if limit != int(limit):
            raise LlmdropError(f"--limit of {limit}: give a whole number of documents or a fraction below 1")
        return int(limit)
    return float(limit)


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise LlmdropError(f"--tasks needs lm-evaluation-harness (lm-eval 0.4.x): {INSTALL} ({e})") from None
    return lm_eval, TaskManager


def task_manager(names: list[str], include_path=None):
    """A TaskManager that knows ``names`` (bundled tasks, the user's YAML folder, then lm-eval's own ~15k, which
    take a while to index and are only read when a name is not found in the first two)."""
    _, TaskManager = _import_lm_eval()
    paths = [TASKS_DIR]
    if include_path is not None:
        folder = Path(include_path).expanduser()
        if not folder.is_dir():
            raise LlmdropError(f"--include-path {include_path}: no such directory (a folder of lm-eval task YAMLs)")
        paths.append(folder)
    quiet = logging.getLogger("lm_eval")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # indexing warns about every YAML it cannot parse on its own
    try:
        manager = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
        if not set(names) <= set(manager.all_tasks):
            manager = TaskManager(include_path=[str(p) for p in paths])
    finally:
        quiet.setLevel(level)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        hints = [m for n in unknown for m in difflib.get_close_matches(n, manager.all_tasks, n=1)]
        hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
        where = f" nor in {include_path}" if include_path is not None else ""
        raise LlmdropError(
            f"unknown task {', '.join(unknown)}: not an lm-eval task, group or tag, not bundled with llmdrop"
            f"{where}{hint}; your own YAML tasks go in a folder given with --include-path"
        )
    return manager


@contextmanager
def offline():
    """No Hub access for the duration of the run (yields True), unless the user set HF_HUB_OFFLINE /
    HF_DATASETS_OFFLINE themselves (yields False; ``HF_HUB_OFFLINE=0`` lets datasets download). huggingface_hub and
    datasets read these variables when imported, so their constants are set too."""
    if any(v in os.environ for v in OFFLINE_VARS):
        yield False
        return
    import datasets.config
    import huggingface_hub.constants

    saved = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    os.environ.update(dict.fromkeys(OFFLINE_VARS, "1"))
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield True
    finally:
        for v in OFFLINE_VARS:
            os.environ.pop(v, None)
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _not_local(e: Exception) -> bool:
    """Whether ``e`` is datasets / huggingface_hub saying the data is not on this machine (offline or no network)."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(e, (OfflineModeIsEnabled, ConnectionError)):
        return True
    text = str(e)
    return "offline" in text.lower() or "Couldn't reach" in text or "couldn't be found on the Hugging Face Hub" in text


def run(
    loaded: LoadedModel,
    names: list[str],
    manager,
    *,
    num_fewshot: int | None = None,
    limit=None,
    batch_size: int = 1,
    log_samples: bool = False,
) -> dict:
    """lm-eval's ``simple_evaluate`` on ``loaded`` (its raw output)."""
    lm_eval, _ = _import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    quiet = logging.getLogger("lm_eval")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # e.g. "pretrained is not a str" for every run, though that is how it is meant
    try:
        lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size)
        with offline() as forced:
            try:
                return lm_eval.simple_evaluate(
                    model=lm,
                    tasks=names,
                    num_fewshot=num_fewshot,
                    limit=limit,
                    task_manager=manager,
                    log_samples=log_samples,
                )
            except Exception as e:
                if not _not_local(e):
                    raise
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                online = " or, with a network, run with HF_HUB_OFFLINE=0 to let datasets download it" if forced else ""
                raise LlmdropError(
                    f"the data of {', '.join(names)} is not on this machine and the Hub cannot be reached "
                    f"({type(e).__name__}: {first}); point the task at local files (docs/evaluation.md){online}"
                ) from e
    finally:
        quiet.setLevel(level)


def _metrics(values: dict) -> dict:
    """``{"acc,none": 0.5, "acc_stderr,none": 0.02, "alias": ...}`` -> ``{"acc": 0.5, "acc_stderr": 0.02}``
    (a filter other than ``none`` stays in the name: ``exact_match,strict-match``)."""
    out = {}
    for key, value in values.items():
        metric, _, filt = key.partition(",")
        if filt:  # not "alias" and the like
            out[metric if filt == "none" else key] = None if value == "N/A" else value  # N/A: no stderr computed
    return out


def summarise(raw: dict, *, limit=None) -> list[dict]:
    """One entry per task (and group) of a raw lm-eval result: task, metrics, samples scored, shots."""
    import lm_eval

    rows = []
    for name, values in raw["results"].items():
        counts = raw.get("n-samples", {}).get(name, {})
        rows.append(
            {
                "task": name,
                "metrics": _metrics(values),
                "samples": counts.get("effective"),
                "num_fewshot": raw.get("n-shot", {}).get(name),
                "limit": limit,
                "version": raw.get("versions", {}).get(name),
                "harness": f"lm-eval {lm_eval.__version__}",
            }
        )
    return rows


def evaluate_tasks(
    loaded: LoadedModel,
    names: list[str],
    manager,
    *,
    num_fewshot: int | None = None,
    limit=None,
    batch_size: int = 1,
) -> list[dict]:
    """The tasks' metrics on ``loaded`` (see ``summarise``)."""
    raw = run(loaded, names, manager, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size)
    return summarise(raw, limit=limit)
