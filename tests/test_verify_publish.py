"""verify (hashes, stages, quantization_config) and publish (directory copy, hub upload against a local fake hub)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fake_artifact import make_run_dir

from pipeline.artifact.verify import PUBLISHED_MANIFEST, quantization_problems
from pipeline.cli import main
from pipeline.formats import SCHEMES
from pipeline.recipe.load import build_recipe, recipe_yaml
from pipeline.run.context import RECIPE_FILE
from pipeline.run.files import sha256_file
from pipeline.run.manifest import Manifest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return make_run_dir(tmp_path)


def qpipe(*args: str | Path) -> int:
    return main([str(a) for a in args])


def edit_manifest(run_dir: Path, change: Any) -> None:
    manifest = Manifest.load(run_dir / "manifest.json")
    change(manifest)
    manifest.save(run_dir / "manifest.json")


# verify


def test_verify_passes_on_a_finished_run(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert qpipe("verify", run_dir) == 0
    assert capsys.readouterr().out.strip() == f"{run_dir}: OK (5 files match the manifest, gate passed)"


def test_verify_accepts_and_names_a_smoke_test_unsupported_here(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = make_run_dir(tmp_path, smoke=False)

    def unsupported(manifest: Manifest) -> None:
        manifest.stages["smoke"].status = "unsupported"

    edit_manifest(run_dir, unsupported)
    assert qpipe("verify", run_dir) == 0
    assert "no results from smoke unsupported" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("tamper", "problem"),
    [
        (lambda m: m.joinpath("model.safetensors").write_bytes(b"x" * 10), "model/model.safetensors: sha256 differs"),
        (lambda m: m.joinpath("README.md").write_text("# my card\n"), "model/README.md: sha256 differs"),
        (lambda m: m.joinpath("tokenizer_config.json").unlink(), "model/tokenizer_config.json: missing"),
        (lambda m: m.joinpath("extra.safetensors").write_bytes(b"x"), "model/extra.safetensors: not in the manifest"),
    ],
    ids=["weights-modified", "card-modified", "file-removed", "file-added"],
)
def test_verify_lists_every_file_mismatch(
    run_dir: Path, capsys: pytest.CaptureFixture[str], tamper: Any, problem: str
) -> None:
    tamper(run_dir / "model")
    assert qpipe("verify", run_dir) == 1
    err = capsys.readouterr().err
    assert problem in err
    assert "verify failed with 1 problem(s)" in err


def test_verify_requires_every_stage_to_have_passed(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def fail_smoke(manifest: Manifest) -> None:
        manifest.stages["smoke"].status = "failed"
        del manifest.stages["card"]

    edit_manifest(run_dir, fail_smoke)
    (run_dir / "model" / "README.md").unlink()
    assert qpipe("verify", run_dir) == 1
    err = capsys.readouterr().err
    assert "smoke: status 'failed'; expected done or disabled" in err
    assert "card: no record in the manifest" in err


def test_verify_checks_quantization_config_against_the_recipe(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path = run_dir / "model" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 8
    config_path.write_text(json.dumps(config))

    def rehash(manifest: Manifest) -> None:  # a consistent manifest, so only the recipe check can catch it
        manifest.stages["export"].outputs["files"]["config.json"]["sha256"] = sha256_file(config_path)

    edit_manifest(run_dir, rehash)
    assert qpipe("verify", run_dir) == 1
    assert "config.json: group_0.weights.num_bits: 8, recipe promised 4" in capsys.readouterr().err


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_recipe_expectations_match_compressed_tensors_presets(tmp_path: Path, scheme: str) -> None:
    """verify's per-scheme expectations agree with the library that writes the config (no false alarms)."""
    from compressed_tensors.quantization import preset_name_to_scheme

    preset = preset_name_to_scheme(scheme, ["Linear"]).model_dump(mode="json")
    group = {"weights": preset["weights"], "input_activations": preset["input_activations"]}
    config = {"quantization_config": {"quant_method": "compressed-tensors", "config_groups": {"group_0": group}}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    recipe = build_recipe({"name": "x", "quantize": {"method": "rtn", "scheme": scheme}}, "test")
    (tmp_path / RECIPE_FILE).write_text(recipe_yaml(recipe))
    assert quantization_problems(tmp_path) == []


def test_verify_failed_gate_exits_3_unless_allowed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = make_run_dir(tmp_path, outcome="failed")
    assert qpipe("verify", run_dir) == 3
    assert "only a passed quality gate is published (manifest gate: failed)" in capsys.readouterr().err
    assert qpipe("verify", run_dir, "--allow-failed-gate") == 0


def test_an_inconclusive_gate_is_not_published(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Too few questions to decide: exit 4, nothing written, unless explicitly allowed."""
    run_dir = make_run_dir(tmp_path, outcome="inconclusive")
    dest = tmp_path / "published"
    assert qpipe("publish", run_dir, "--to", dest) == 4
    assert "manifest gate: inconclusive" in capsys.readouterr().err and not dest.exists()
    assert qpipe("publish", run_dir, "--to", dest, "--allow-failed-gate") == 0


def test_verify_names_a_folder_that_is_not_an_artifact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert qpipe("verify", tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a qpipe artifact" in err and "pass a run directory" in err


# publish to a directory


def test_publish_to_directory_yields_a_verifiable_copy(run_dir: Path, tmp_path: Path) -> None:
    dest = tmp_path / "registry" / "model-w4a16"
    assert qpipe("publish", run_dir, "--to", dest) == 0
    published = sorted(p.name for p in dest.iterdir())
    assert published == sorted([*(p.name for p in (run_dir / "model").iterdir()), PUBLISHED_MANIFEST])
    assert (dest / "model.safetensors").read_bytes() == (run_dir / "model" / "model.safetensors").read_bytes()
    assert qpipe("verify", dest) == 0
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_publish_accepts_file_url_and_replaces_an_earlier_publish_only_when_asked(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "registry"
    assert qpipe("publish", run_dir, "--to", f"file://{dest}") == 0
    assert qpipe("publish", run_dir, "--to", f"file://{dest}") == 2
    assert "holds an earlier publish; pass --replace" in capsys.readouterr().err
    (dest / "README.md").write_text("edited by hand")
    assert qpipe("publish", run_dir, "--to", f"file://{dest}", "--replace") == 0
    assert qpipe("verify", dest) == 0


def test_replace_keeps_files_no_publish_wrote(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "registry"
    assert qpipe("publish", run_dir, "--to", dest) == 0
    (dest / "notes.txt").write_text("mine")
    assert qpipe("publish", run_dir, "--to", dest, "--replace") == 2
    assert "holds notes.txt that no publish wrote" in capsys.readouterr().err
    assert (dest / "notes.txt").read_text() == "mine" and (dest / PUBLISHED_MANIFEST).is_file()


def test_publish_refuses_a_tampered_artifact(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (run_dir / "model" / "model.safetensors").write_bytes(b"tampered")
    dest = tmp_path / "out"
    assert qpipe("publish", run_dir, "--to", dest, "--allow-failed-gate") == 1
    assert "model/model.safetensors: sha256 differs" in capsys.readouterr().err
    assert not dest.exists()


def test_publish_refuses_a_failed_gate_unless_allowed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = make_run_dir(tmp_path, outcome="failed")
    dest = tmp_path / "out"
    assert qpipe("publish", run_dir, "--to", dest) == 3
    assert "--allow-failed-gate" in capsys.readouterr().err
    assert not dest.exists()
    assert qpipe("publish", run_dir, "--to", dest, "--allow-failed-gate") == 0
    assert "Quality gate FAILED" in (dest / "README.md").read_text()


def test_publish_dry_run_lists_files_and_changes_nothing(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "out"
    assert qpipe("publish", run_dir, "--to", dest, "--dry-run") == 0
    out = capsys.readouterr().out
    assert f"would publish {run_dir} (gate passed) to {dest}" in out
    for name in ("model.safetensors", "README.md", "config.json", PUBLISHED_MANIFEST):
        assert re.search(rf"^\s+[\d,]+  {re.escape(name)}$", out, re.MULTILINE)
    assert "6 files" in out
    assert not dest.exists()


def test_publish_will_not_overwrite_a_foreign_directory(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "home"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    assert qpipe("publish", run_dir, "--to", dest) == 2
    assert "not a qpipe-published folder" in capsys.readouterr().err
    assert (dest / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("target", ["s3://bucket/model", "hf://only-a-name", "file://host/path"])
def test_publish_rejects_unknown_targets(run_dir: Path, target: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert qpipe("publish", run_dir, "--to", target) == 2
    assert "use hf://org/name[@revision], file:///absolute/path or a directory" in capsys.readouterr().err


# publish to the hub: huggingface_hub's own client against a hub stand-in on 127.0.0.1


class FakeHub(ThreadingHTTPServer):
    """The few hub endpoints create_repo, create_branch and upload_folder call; records what they receive."""

    def __init__(self, refuse_with: int | None = None) -> None:
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.refuse_with = refuse_with
        self.calls: list[tuple[str, str]] = []
        self.commits: list[dict[str, Any]] = []
        self.created: list[dict[str, Any]] = []
        self.remote = {".gitattributes": b"*.safetensors filter=lfs\n", "old-model.safetensors": b"old"}
        self.tamper: str | None = None  # a file whose hub copy differs from what was committed

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def blob_id(data: bytes) -> str:
    """The git object id of a file's bytes, as the hub reports it for files not in LFS."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubHandler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args: Any) -> None:
        pass

    def reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.server.calls.append(("GET", self.path))
        if "/tree/" in self.path:
            self.reply_list(
                [
                    {"type": "file", "path": p, "size": len(data), "oid": blob_id(data)}
                    for p, data in self.server.remote.items()
                ]
            )
        else:
            self.reply(404, {"error": "not implemented by the fake hub"})

    def reply_list(self, body: list[dict[str, Any]]) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        path = self.path.split("?", 1)[0]
        self.server.calls.append(("POST", path))
        if self.headers.get("authorization") != "Bearer hf_fake_token":
            self.reply(401, {"error": "Invalid credentials"})
        elif self.server.refuse_with:
            self.reply(
                self.server.refuse_with, {"error": "You don't have the rights to create a model under this namespace"}
            )
        elif path == "/api/repos/create":
            payload = json.loads(body)
            self.server.created.append(payload)
            self.reply(200, {"url": f"{self.server.url}/{payload['organization']}/{payload['name']}"})
        elif path == "/api/validate-yaml":
            self.reply(200, {"errors": [], "warnings": []})
        elif "/branch/" in path:
            self.reply(200, {})
        elif "/preupload/" in path:
            files = json.loads(body)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            self.reply(200, {"files": modes})
        elif match := re.fullmatch(r"/api/models/(.+)/commit/(.+)", path):
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            files = {e["value"]["path"]: base64.b64decode(e["value"]["content"]) for e in lines if e["key"] == "file"}
            header = next(e["value"] for e in lines if e["key"] == "header")
            deleted = sorted(e["value"]["path"] for e in lines if e["key"] == "deletedFile")
            commit = {"repo": match[1], "revision": match[2], "files": files, "deleted": deleted, **header}
            self.server.commits.append(commit)
            kept = {p: d for p, d in self.server.remote.items() if p not in deleted}
            self.server.remote = {**kept, **files}
            if self.server.tamper:
                self.server.remote[self.server.tamper] += b" "
            self.reply(200, {"commitUrl": f"{self.server.url}/{match[1]}/commit/c0ffee", "commitOid": "c0ffee"})
        else:
            self.reply(404, {"error": f"unknown endpoint {path}"})


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def publish_cli(hub: FakeHub, tmp_path: Path, *args: str | Path, token: str | None = "hf_fake_token") -> Any:
    """`qpipe publish` in a fresh process, configured only through the usual environment variables."""
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf-home")}
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    command = [sys.executable, "-m", "pipeline.cli", "publish", *map(str, args)]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_publish_uploads_model_folder_and_manifest_in_one_commit(hub: FakeHub, run_dir: Path, tmp_path: Path) -> None:
    result = publish_cli(hub, tmp_path, run_dir, "--to", "hf://my-org/Qwen3-0.6B-gptq@v1")
    assert result.returncode == 0, result.stderr
    assert f"{hub.url}/my-org/Qwen3-0.6B-gptq/commit/c0ffee" in result.stdout
    assert ("POST", "/api/repos/create") in hub.calls
    assert hub.created[0]["visibility"] == "private"  # unless --public
    assert ("POST", "/api/models/my-org/Qwen3-0.6B-gptq/branch/v1") in hub.calls
    (commit,) = hub.commits
    assert (commit["repo"], commit["revision"]) == ("my-org/Qwen3-0.6B-gptq", "v1")
    assert commit["deleted"] == ["old-model.safetensors"]  # an earlier upload's file goes in the same commit
    uploaded = commit["files"]
    expected = {p.name: p.read_bytes() for p in (run_dir / "model").iterdir()}
    assert {k: v for k, v in uploaded.items() if k != PUBLISHED_MANIFEST} == expected
    manifest = Manifest.model_validate_json(uploaded[PUBLISHED_MANIFEST])
    card = manifest.stages["card"].outputs
    assert hashlib.sha256(uploaded["README.md"]).hexdigest() == card["sha256"]
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".publish-")]  # staging folder removed
    assert ("GET", "/api/models/my-org/Qwen3-0.6B-gptq/tree/c0ffee?recursive=true&expand=false") in hub.calls
    assert str(tmp_path) not in uploaded[PUBLISHED_MANIFEST].decode()  # no local paths: the base model's folder
    assert manifest.command == f"qpipe run gptq --model {manifest.model['identity']}"
    assert Manifest.load(run_dir / "manifest.json").model["path"].startswith(str(tmp_path))  # the run's own: kept


def test_publish_fails_when_the_hub_copy_differs(hub: FakeHub, run_dir: Path, tmp_path: Path) -> None:
    """After the commit the remote tree is read back: a file whose hub copy differs fails the publish (exit 1)."""
    hub.tamper = "config.json"
    result = publish_cli(hub, tmp_path, run_dir, "--to", "hf://my-org/x")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert "does not match what was uploaded: config.json: content differs" in last


def test_publish_to_hub_refuses_a_tampered_artifact_before_any_request(
    hub: FakeHub, run_dir: Path, tmp_path: Path
) -> None:
    (run_dir / "model" / "config.json").write_text("{}")
    result = publish_cli(hub, tmp_path, run_dir, "--to", "hf://my-org/x")
    assert result.returncode == 1
    assert "model/config.json: sha256 differs" in result.stderr
    assert hub.calls == []


def test_publish_to_hub_needs_a_token(hub: FakeHub, run_dir: Path, tmp_path: Path) -> None:
    result = publish_cli(hub, tmp_path, run_dir, "--to", "hf://my-org/x", token=None)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: publish: no Hugging Face token; set HF_TOKEN to a token with write access"
    )
    assert hub.calls == []


def test_publish_to_hub_reports_a_refusal_in_one_line(run_dir: Path, tmp_path: Path) -> None:
    server = FakeHub(refuse_with=403)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = publish_cli(server, tmp_path, run_dir, "--to", "hf://someone-else/x")
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: publish: the hub refused the upload to hf://someone-else/x (403")
    assert last.endswith("check HF_TOKEN")
