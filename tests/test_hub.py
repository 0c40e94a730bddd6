"""Hub round trip: ``push_to_hub`` uploads the checkpoint and its model card through
``huggingface_hub``'s real client, and ``from_pretrained`` downloads it with the revision, token,
cache directory and offline switch it was given.

The network is replaced at the HTTP layer: ``huggingface_hub.set_client_factory`` gives its client
an ``httpx`` mock transport that answers like the Hub (repo creation, pre-upload, commit,
revision info, file resolution), so every request and header the client really sends is seen.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re

import httpx2
import pytest
import torch
from conftest import fast_model, synth_music

from apex_reward import ApexRewardModel
from apex_reward.errors import CheckpointError, ConfigError
from apex_reward.hub import NOT_RECORDED, model_card
from apex_reward.loading import ModelOptions, load_model

TOKEN = "hf_test_token_abc"


class FakeHub:
    """A Hub that keeps repos in memory: ``repos[repo_id][branch] = {path: bytes}``."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}
        self.commits: dict[str, tuple[str, str]] = {}  # sha -> (repo, branch)
        self.requests: list[httpx2.Request] = []
        self.validated: list[str] = []
        self.read_only: set[str] = set()  # commits to these repos get 403

    def sha(self, repo: str, branch: str) -> str:
        files = self.repos[repo][branch]
        digest = hashlib.sha1(repr(sorted((k, v) for k, v in files.items())).encode())
        sha = digest.hexdigest()
        self.commits[sha] = (repo, branch)
        return sha

    def files_at(self, repo: str, rev: str) -> dict[str, bytes] | None:
        if rev in self.commits:
            repo_, branch = self.commits[rev]
            return self.repos[repo_][branch] if repo_ == repo else None
        return self.repos.get(repo, {}).get(rev)

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        path, method = request.url.path, request.method
        if method == "POST" and path == "/api/repos/create":
            body = json.loads(request.content)
            repo = f"{body['organization']}/{body['name']}"
            self.repos.setdefault(repo, {"main": {}})
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{repo}"})
        if method == "POST" and path == "/api/validate-yaml":  # the card's front matter
            self.validated.append(json.loads(request.content)["content"])
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/branch/(.+)", path)
        if method == "POST" and m:
            repo, branch = m.groups()
            self.repos[repo].setdefault(branch, dict(self.repos[repo]["main"]))
            return httpx2.Response(200, json={})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/(.+)", path)
        if method == "POST" and m:
            files = json.loads(request.content)["files"]
            return httpx2.Response(
                200,
                json={
                    "files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                        for f in files
                    ]
                },
            )
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/(.+)", path)
        if method == "POST" and m:
            repo, branch = m.groups()
            if repo in self.read_only:
                return httpx2.Response(403, json={"error": "You don't have the rights"})
            branch = httpx2.URL(f"/{branch}").path[1:]
            tree = self.repos[repo].setdefault(branch, {})
            for line in request.content.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    tree[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            sha = self.sha(repo, branch)
            return httpx2.Response(
                200,
                json={"commitUrl": f"https://huggingface.co/{repo}/commit/{sha}", "commitOid": sha},
            )
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/(.+)", path)
        if method == "GET" and m:
            repo, rev = m.groups()
            files = self.files_at(repo, rev)
            if files is None:
                return httpx2.Response(404, headers={"X-Error-Code": "RevisionNotFound"})
            sha = self.sha(repo, rev) if rev not in self.commits else rev
            return httpx2.Response(
                200,
                json={"id": repo, "sha": sha, "siblings": [{"rfilename": f} for f in files]},
            )
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path)
        if method == "GET" and m:
            files = self.files_at(*m.groups()) or {}
            return httpx2.Response(
                200,
                json=[
                    {"type": "file", "path": k, "size": len(v), "oid": hashlib.sha1(v).hexdigest()}
                    for k, v in files.items()
                ],
            )
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            repo, rev, name = m.groups()
            files = self.files_at(repo, rev)
            if files is None or name not in files:
                return httpx2.Response(404, headers={"X-Error-Code": "EntryNotFound"})
            data = files[name]
            headers = {
                "X-Repo-Commit": rev if rev in self.commits else self.sha(repo, rev),
                "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                "Content-Length": str(len(data)),
            }
            return httpx2.Response(200, headers=headers, content=b"" if method == "HEAD" else data)
        return httpx2.Response(404, json={"error": f"fake hub: no route for {method} {path}"})


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    fake = FakeHub()
    # the test suite runs offline; the requests below never leave the process
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(fake)))
    huggingface_hub.close_session()
    yield fake
    huggingface_hub.set_client_factory(huggingface_hub.utils._http.default_client_factory)
    huggingface_hub.close_session()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_model() -> ApexRewardModel:
    return fast_model()  # 2 s segments: one segment per test clip


def rewards(model: ApexRewardModel) -> torch.Tensor:
    audio = [torch.from_numpy(synth_music(1.5, 24000, seed=s)[0]) for s in (1, 2)]
    with torch.no_grad():
        return model(audio, 24000).reward


def test_push_to_hub_uploads_checkpoint_and_card_and_from_pretrained_reads_it(
    hub, tiny_model, tmp_path
):
    url = tiny_model.push_to_hub(
        "apex-org/tiny-apex", token=TOKEN, revision="v1", license="cc-by-nc-4.0"
    )
    files = hub.repos["apex-org/tiny-apex"]["v1"]
    assert set(files) == {"config.json", "model.safetensors", "README.md"}
    assert url.startswith("https://huggingface.co/apex-org/tiny-apex/commit/")
    sent = [r for r in hub.requests if r.method == "POST"]
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in sent)
    card = files["README.md"].decode()
    assert card.startswith("---\nlibrary_name: apex-reward\nlicense: cc-by-nc-4.0\n")
    assert "UNTRAINED" in card and "| coherence | 1–5 |" in card
    assert hub.validated == [card]  # the client had the Hub check the card's metadata

    cache = tmp_path / "cache"
    hub.requests.clear()
    loaded = ApexRewardModel.from_pretrained(
        "apex-org/tiny-apex", revision="v1", token=TOKEN, cache_dir=cache
    )
    got = [r for r in hub.requests]
    assert got and all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in got)
    assert any("/revision/v1" in r.url.path for r in got)
    assert list(cache.rglob("model.safetensors"))  # downloaded into the given cache
    torch.testing.assert_close(rewards(loaded), rewards(tiny_model))

    # offline: served from that cache with no request at all
    hub.requests.clear()
    again = ApexRewardModel.from_pretrained(
        "apex-org/tiny-apex", revision="v1", cache_dir=cache, local_files_only=True
    )
    assert hub.requests == []
    torch.testing.assert_close(rewards(again), rewards(tiny_model))
    # the jobs' loader (every command's --cache-dir/--local-files-only) takes the same path
    opts = ModelOptions(
        model="apex-org/tiny-apex",
        revision="v1",
        device="cpu",
        cache_dir=str(cache),
        local_files_only=True,
    )
    torch.testing.assert_close(rewards(load_model(opts)), rewards(tiny_model))
    assert hub.requests == []
    # ...and a repo that is not in the cache is an error naming it, still without a request
    with pytest.raises(CheckpointError, match="apex-org/other"):
        ApexRewardModel.from_pretrained("apex-org/other", cache_dir=cache, local_files_only=True)
    assert hub.requests == []
    # the default branch has no checkpoint: the revision was really sent
    with pytest.raises(CheckpointError, match="tiny-apex"):
        ApexRewardModel.from_pretrained("apex-org/tiny-apex", cache_dir=tmp_path / "c2")


def test_push_to_hub_reports_refusals_and_bad_ids(hub, tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="org/name"):
        tiny_model.push_to_hub("no-namespace")
    with pytest.raises(ConfigError, match="report.json not found"):
        tiny_model.push_to_hub("apex-org/audited", audit=tmp_path)
    report = {"policy": "flag", "verdict": {"exit_status": 0, "failing_probes": []}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    (tmp_path / "report.md").write_text("# audit\n")
    tiny_model.push_to_hub("apex-org/audited", audit=tmp_path)
    files = hub.repos["apex-org/audited"]["main"]
    assert {"audit/report.json", "audit/report.md", "README.md"} <= set(files)
    assert "failing: none" in files["README.md"].decode()
    hub.read_only.add("apex-org/locked")
    with pytest.raises(CheckpointError, match="push_to_hub apex-org/locked.*403"):
        tiny_model.push_to_hub("apex-org/locked", token=TOKEN)


def test_model_card_reports_what_the_checkpoint_records(tiny_model):
    cfg = tiny_model.config.to_dict()
    cfg["untrained"] = False
    cfg["training"] = {
        "config": {"prepared": "data/prepared/manifest.parquet", "seed": 3},
        "best_epoch": 17,
        "test_metrics": {"streams": {"mse": 12.5, "pearson": 0.61}, "clarity": {"mse": 0.2}},
        "base_checkpoint": "runs/base",
    }
    cfg["calibration"] = {"temperature": 0.73, "pairs": 4000}
    audit = {
        "policy": "penalize",
        "reference": {"count": 12, "kind": "files", "median": 0.41},
        "verdict": {"exit_status": 1, "failing_probes": ["white_noise"], "counted_probes": 9},
    }
    card = model_card(cfg, repo_id="o/m", license="mit", audit=audit)
    assert "UNTRAINED" not in card
    assert "- best epoch: 17" in card and "- prepared: data/prepared/manifest.parquet" in card
    assert "| streams | 12.5 | 0.61 |" in card and f"| clarity | 0.2 | {NOT_RECORDED} |" in card
    assert '"temperature": 0.73' in card
    assert f"- ood: {NOT_RECORDED}" in card
    assert "failing: white_noise" in card and "exit status: 1" in card
    assert "Weights: mit." in card
    # an older checkpoint with none of that: every absent figure says so
    bare = model_card(tiny_model.config.to_dict())
    assert f"Audit: {NOT_RECORDED}" in bare and f"Weights: {NOT_RECORDED}." in bare
    assert "license: other" in bare


def test_push_command_writes_the_card_or_names_what_is_missing(tmp_path, capsys):
    from conftest import make_tiny_model

    from apex_reward.cli import main

    d = tmp_path / "ckpt"
    make_tiny_model(seed=3).save_pretrained(d)
    assert main(["push", "--model", str(d), "--write-card", "--license", "cc-by-nc-4.0"]) == 0
    card = (d / "README.md").read_text()
    assert capsys.readouterr().out.strip() == str(d / "README.md")
    assert "license: cc-by-nc-4.0" in card and "not recorded" in card
    assert main(["push", "--model", str(d)]) != 0
    assert "--repo-id org/name" in capsys.readouterr().err
