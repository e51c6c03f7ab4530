"""The local Hub server against the unmodified huggingface_hub, transformers and datasets clients.

Every test publishes its own repos (unique names) on the session-wide server that HF_ENDPOINT points at, and gets
its own empty HF_HOME, so nothing is shared through the download cache.
"""

from __future__ import annotations

import hashlib
import http.client
import itertools
import json
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.hubserver import LocalHub

pytestmark = pytest.mark.usefixtures("hf_home")

_names = itertools.count()


def _unique(name: str) -> str:
    """A repo name no other test uses on the shared server."""
    return f"{name}-{next(_names)}"


def _card(base_model: str | None = None, **fields: object) -> bytes:
    """A README.md with YAML front matter, as a model card."""
    import yaml

    data = dict(fields)
    if base_model is not None:
        data["base_model"] = base_model
    return f"---\n{yaml.safe_dump(data)}---\n# A tiny test model\n".encode()


def _tiny_bert(seed: int):
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    return transformers.BertModel(config).eval()


@pytest.fixture(scope="module")
def bert_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny BERT ("base") and a perturbed copy ("ft"), each saved with save_pretrained (config + safetensors)."""
    import torch

    root = tmp_path_factory.mktemp("bert")
    base = _tiny_bert(seed=0)
    base.save_pretrained(root / "base")
    with torch.no_grad():
        for parameter in base.parameters():
            parameter.add_(0.01)
    base.save_pretrained(root / "ft")
    return {"base": root / "base", "ft": root / "ft"}


def _publish_pair(hub: LocalHub, bert_dirs: dict[str, Path], org: str) -> tuple[str, str, str]:
    """Publish base and fine-tune (whose card names the base); return (base id, fine-tune id, fine-tune sha)."""
    base_id, ft_id = f"{org}/base", f"{org}/ft"
    hub.upload_folder(base_id, bert_dirs["base"])
    hub.commit(base_id, {"README.md": _card(library_name="transformers")})
    files: dict[str, bytes | Path] = {p.name: p for p in bert_dirs["ft"].iterdir()}
    files["README.md"] = _card(base_model=base_id, library_name="transformers", tags=["sst2"], datasets=["glue"])
    return base_id, ft_id, hub.commit(ft_id, files, message="Add fine-tune")


def _state_equal(a, b) -> bool:
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------------------- huggingface_hub


def test_model_info_reports_sha_siblings_card_and_derived_tags(local_hub: LocalHub, bert_dirs) -> None:
    from huggingface_hub import HfApi

    base_id, ft_id, sha = _publish_pair(local_hub, bert_dirs, _unique("info"))
    api = HfApi()
    info = api.model_info(ft_id)

    assert info.id == ft_id and info.sha == sha
    assert info.author == ft_id.split("/")[0]
    assert info.private is False and info.gated is False and info.disabled is False
    assert info.last_modified is not None
    assert sorted(s.rfilename for s in info.siblings) == ["README.md", "config.json", "model.safetensors"]
    weights = next(s for s in info.siblings if s.rfilename == "model.safetensors")
    data = (bert_dirs["ft"] / "model.safetensors").read_bytes()
    assert weights.size == len(data) and weights.lfs is not None and weights.lfs.size == len(data)
    assert info.card_data.base_model == base_id
    for tag in ("transformers", "sst2", "dataset:glue", f"base_model:{base_id}", f"base_model:finetune:{base_id}"):
        assert tag in info.tags
    n_params = sum(p.numel() for p in _tiny_bert(seed=0).parameters())
    assert info.safetensors.total == n_params and info.safetensors.parameters == {"F32": n_params}
    assert info.config["architectures"] == ["BertModel"]

    assert api.repo_exists(ft_id) and not api.repo_exists(f"{ft_id}-missing")
    assert api.revision_exists(ft_id, sha) and not api.revision_exists(ft_id, "no-such-branch")
    assert sorted(api.list_repo_files(ft_id)) == ["README.md", "config.json", "model.safetensors"]
    only_card = api.model_info(ft_id, expand=["cardData"])
    assert only_card.card_data.base_model == base_id and only_card.sha is None


def test_refs_commits_tree_and_paths_info(local_hub: LocalHub) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import EntryNotFoundError

    repo_id = f"org/{_unique('refs')}"
    first = local_hub.commit(repo_id, {"a.txt": b"1", "dir/sub/b.txt": b"2"}, message="first\n\nlonger text")
    second = local_hub.commit(repo_id, {"a.txt": b"3"}, message="second")
    local_hub.tag(repo_id, "v1", first)
    dev = local_hub.commit(repo_id, {"c.txt": b"4"}, branch="dev", message="on dev")
    api = HfApi()

    refs = api.list_repo_refs(repo_id)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": second, "dev": dev}
    assert [(t.name, t.ref, t.target_commit) for t in refs.tags] == [("v1", "refs/tags/v1", first)]

    commits = api.list_repo_commits(repo_id)
    assert [c.commit_id for c in commits[:2]] == [second, first]
    assert [c.title for c in commits] == ["second", "first", "initial commit"]
    assert commits[1].message == "longer text"
    assert [c.commit_id for c in api.list_repo_commits(repo_id, revision="dev")][:2] == [dev, second]

    top = {e.path: type(e).__name__ for e in api.list_repo_tree(repo_id)}
    assert top == {"a.txt": "RepoFile", "dir": "RepoFolder"}
    everything = [e.path for e in api.list_repo_tree(repo_id, recursive=True)]
    assert everything == ["a.txt", "dir", "dir/sub", "dir/sub/b.txt"]
    (nested,) = api.list_repo_tree(repo_id, path_in_repo="dir/sub", expand=True)
    assert nested.path == "dir/sub/b.txt" and nested.last_commit.oid == first
    assert {e.path for e in api.list_repo_tree(repo_id, revision="dev")} == {"a.txt", "c.txt", "dir"}
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(repo_id, path_in_repo="nope"))

    infos = api.get_paths_info(repo_id, ["a.txt", "dir", "missing.txt"], revision=first, expand=True)
    assert [(type(i).__name__, i.path) for i in infos] == [("RepoFile", "a.txt"), ("RepoFolder", "dir")]
    assert infos[0].size == 1 and infos[0].last_commit.oid == first


def test_downloads_snapshot_with_patterns_and_cache_layout(local_hub: LocalHub, bert_dirs, hf_home: Path) -> None:
    from huggingface_hub import hf_hub_download, snapshot_download

    _, ft_id, sha = _publish_pair(local_hub, bert_dirs, _unique("dl"))
    config = hf_hub_download(ft_id, "config.json")
    assert Path(config).read_bytes() == (bert_dirs["ft"] / "config.json").read_bytes()
    assert f"snapshots/{sha}/" in Path(config).as_posix() and Path(config).is_relative_to(hf_home)

    folder = Path(snapshot_download(ft_id, allow_patterns=["*.safetensors", "*.json"]))
    assert folder.name == sha
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    weights = (bert_dirs["ft"] / "model.safetensors").read_bytes()
    assert (folder / "model.safetensors").read_bytes() == weights
    # The cache names LFS blobs after the sha-256 ETag and regular files after the git blob sha-1.
    blobs = {p.name for p in (hf_home / "hub" / f"models--{ft_id.replace('/', '--')}" / "blobs").iterdir()}
    assert hashlib.sha256(weights).hexdigest() in blobs
    config_bytes = (bert_dirs["ft"] / "config.json").read_bytes()
    assert hashlib.sha1(b"blob %d\x00" % len(config_bytes) + config_bytes).hexdigest() in blobs


def test_revision_pinning_by_sha_tag_and_branch(local_hub: LocalHub) -> None:
    from huggingface_hub import hf_hub_download, snapshot_download

    repo_id = f"org/{_unique('pin')}"
    old = local_hub.commit(repo_id, {"config.json": b'{"v": 1}', "keep.json": b"{}"})
    local_hub.tag(repo_id, "v1.0", old)
    new = local_hub.commit(repo_id, {"config.json": b'{"v": 2}'}, delete=["keep.json"])
    local_hub.commit(repo_id, {"config.json": b'{"v": 3}'}, branch="refs-test/dev")

    assert Path(hf_hub_download(repo_id, "config.json")).read_bytes() == b'{"v": 2}'
    assert Path(hf_hub_download(repo_id, "config.json", revision=old)).read_bytes() == b'{"v": 1}'
    assert Path(hf_hub_download(repo_id, "config.json", revision="v1.0")).read_bytes() == b'{"v": 1}'
    # A branch name with "/" travels URL-quoted as one path segment.
    assert Path(hf_hub_download(repo_id, "config.json", revision="refs-test/dev")).read_bytes() == b'{"v": 3}'
    old_folder = Path(snapshot_download(repo_id, revision="v1.0"))
    assert old_folder.name == old and sorted(p.name for p in old_folder.iterdir()) == ["config.json", "keep.json"]
    new_folder = Path(snapshot_download(repo_id, revision=new))
    assert new_folder.name == new and [p.name for p in new_folder.iterdir()] == ["config.json"]


def test_typed_errors(local_hub: LocalHub) -> None:
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    repo_id = f"org/{_unique('errors')}"
    local_hub.commit(repo_id, {"config.json": b"{}"})
    api = HfApi()
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(f"{repo_id}-missing")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org")  # a single-segment id that does not exist
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(f"{repo_id}-missing", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        api.dataset_info(repo_id)  # exists as a model, not as a dataset
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo_id, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "config.json", revision="0" * 40)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.json")


def test_concurrent_snapshot_downloads_are_complete(local_hub: LocalHub) -> None:
    from huggingface_hub import snapshot_download

    repo_id = f"org/{_unique('threads')}"
    files = {f"shard-{i:02d}.bin": bytes([i]) * (1000 + 997 * i) for i in range(24)}
    files.update({f"meta/{i}.json": json.dumps({"i": i}).encode() for i in range(16)})
    local_hub.commit(repo_id, files)
    folder = Path(snapshot_download(repo_id, max_workers=8))
    assert {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == files


def test_list_models_search_author_filters_sort_and_limit(local_hub: LocalHub, bert_dirs) -> None:
    from huggingface_hub import HfApi

    org = _unique("search")
    base_id, ft_id, _ = _publish_pair(local_hub, bert_dirs, org)
    adapter_id = f"{org}/adapter"
    local_hub.commit(adapter_id, {"adapter_config.json": b"{}", "README.md": _card(base_model=base_id)})
    merged_id = f"{org}/merged"
    local_hub.commit(
        merged_id, {"README.md": _card(base_model=[base_id, ft_id], base_model_relation="merge", tags=["sst2"])}
    )
    api = HfApi()

    def ids(**kwargs: object) -> list[str]:
        return [m.id for m in api.list_models(**kwargs)]

    assert ids(filter=f"base_model:finetune:{base_id}") == [ft_id]
    assert ids(filter=f"base_model:adapter:{base_id}") == [adapter_id]  # inferred from adapter_config.json
    assert ids(filter=f"base_model:merge:{ft_id}") == [merged_id]
    assert ids(filter=f"base_model:{base_id}") == [ft_id, adapter_id, merged_id]
    assert ids(filter=["sst2", f"base_model:{base_id}"]) == [ft_id, merged_id]  # several filters: all must match
    assert ids(filter=["sst2", "no-such-tag"]) == []
    assert ids(author=org) == [base_id, ft_id, adapter_id, merged_id]
    assert ids(author=org, search="ADAPT") == [adapter_id]
    assert ids(author=org, sort="created_at") == [merged_id, adapter_id, ft_id, base_id]
    assert ids(author=org, limit=2) == [base_id, ft_id]
    (listed,) = api.list_models(search=ft_id, cardData=True)
    assert listed.card_data.base_model == base_id and listed.siblings is None
    (full,) = api.list_models(search=ft_id, full=True)
    assert sorted(s.rfilename for s in full.siblings) == ["README.md", "config.json", "model.safetensors"]


def test_offline_reuse_does_not_contact_the_server(
    local_hub: LocalHub, bert_dirs, request: pytest.FixtureRequest
) -> None:
    import transformers
    from huggingface_hub import hf_hub_download, snapshot_download

    _, ft_id, sha = _publish_pair(local_hub, bert_dirs, _unique("offline"))
    patterns = ["*.safetensors", "*.json"]
    online = snapshot_download(ft_id, allow_patterns=patterns)
    config = hf_hub_download(ft_id, "config.json")

    request.getfixturevalue("hub_offline")
    before = local_hub.requests
    assert snapshot_download(ft_id, allow_patterns=patterns) == online
    assert hf_hub_download(ft_id, "config.json") == config
    model = transformers.AutoModel.from_pretrained(ft_id)
    assert local_hub.requests == before
    assert _state_equal(model, transformers.BertModel.from_pretrained(bert_dirs["ft"]))
    assert Path(online).name == sha


def test_safetensors_metadata_through_range_requests(local_hub: LocalHub, bert_dirs) -> None:
    from huggingface_hub import HfApi

    _, ft_id, _ = _publish_pair(local_hub, bert_dirs, _unique("st"))
    metadata = HfApi().get_safetensors_metadata(ft_id)
    assert not metadata.sharded
    assert metadata.parameter_count == {"F32": sum(p.numel() for p in _tiny_bert(seed=0).parameters())}


# ---------------------------------------------------------------------------------------------- transformers


def test_transformers_from_pretrained_by_name_and_pinned_revision(local_hub: LocalHub, bert_dirs) -> None:
    import transformers

    repo_id = f"org/{_unique('tf')}"
    first = local_hub.upload_folder(repo_id, bert_dirs["base"])
    local_hub.upload_folder(repo_id, bert_dirs["ft"], message="fine-tuned weights")

    expected_base = transformers.BertModel.from_pretrained(bert_dirs["base"])
    expected_ft = transformers.BertModel.from_pretrained(bert_dirs["ft"])
    latest = transformers.AutoModel.from_pretrained(repo_id)
    assert type(latest).__name__ == "BertModel"
    assert _state_equal(latest, expected_ft)
    assert _state_equal(transformers.AutoModel.from_pretrained(repo_id, revision=first), expected_base)
    with pytest.raises(OSError):
        transformers.AutoModel.from_pretrained(f"{repo_id}-missing")


# ---------------------------------------------------------------------------------------------- datasets


def test_datasets_load_dataset_reads_parquet_splits(local_hub: LocalHub, tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    splits = {
        "train": {"sentence": ["a good film", "a bad film", "fine"], "label": [1, 0, 1]},
        "validation": {"sentence": ["great", "awful"], "label": [1, 0]},
    }
    files: dict[str, bytes | Path] = {}
    for split, columns in splits.items():
        path = tmp_path / f"{split}.parquet"
        pq.write_table(pa.table(columns), path)
        files[f"data/{split}-00000-of-00001.parquet"] = path
    repo_id = f"org/{_unique('ds')}"
    local_hub.commit(repo_id, files, repo_type="dataset")

    validation = datasets.load_dataset(repo_id, split="validation")
    assert validation.to_dict() == splits["validation"]
    assert datasets.load_dataset(repo_id, split="train").to_dict() == splits["train"]


# ---------------------------------------------------------------------------------------------- raw HTTP


def _http(hub: LocalHub) -> http.client.HTTPConnection:
    parts = urlsplit(hub.url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)


def test_resolve_headers_ranges_and_keep_alive(local_hub: LocalHub) -> None:
    repo_id = f"org/{_unique('raw')}"
    data = bytes(range(256)) * 4
    sha = local_hub.commit(repo_id, {"w.bin": data, "dir/x.txt": b"hello"}, repo_type="dataset")
    conn = _http(local_hub)  # one connection for every request below: keep-alive must hold across them

    conn.request("HEAD", f"/datasets/{repo_id}/resolve/main/w.bin")
    head = conn.getresponse()
    assert head.status == 200 and head.read() == b""
    assert head.getheader("Content-Length") == str(len(data)) and head.getheader("X-Repo-Commit") == sha
    assert head.getheader("ETag") == f'"{hashlib.sha256(data).hexdigest()}"'
    assert head.getheader("X-Xet-Hash") is None and head.getheader("Link") is None
    assert head.getheader("Content-Encoding") is None

    for range_header, status, body, content_range in [
        ("bytes=1000-", 206, data[1000:], f"bytes 1000-1023/{len(data)}"),
        ("bytes=10-19", 206, data[10:20], f"bytes 10-19/{len(data)}"),
        ("bytes=-4", 206, data[-4:], f"bytes 1020-1023/{len(data)}"),
        ("bytes=5000-", 416, b"", f"bytes */{len(data)}"),
    ]:
        conn.request("GET", f"/datasets/{repo_id}/resolve/{sha}/w.bin", headers={"Range": range_header})
        response = conn.getresponse()
        assert (response.status, response.read(), response.getheader("Content-Range")) == (
            status,
            body,
            content_range,
        )

    conn.request("GET", f"/datasets/{repo_id}/resolve/main/dir%2Fx.txt")
    response = conn.getresponse()
    hello_oid = hashlib.sha1(b"blob 5\x00hello").hexdigest()  # git's blob id
    assert response.read() == b"hello" and response.getheader("ETag") == f'"{hello_oid}"'

    conn.request("GET", f"/datasets/{repo_id}/resolve/main/missing.txt")
    missing = conn.getresponse()
    assert missing.status == 404 and missing.getheader("X-Error-Code") == "EntryNotFound"
    assert missing.getheader("X-Repo-Commit") == sha and "error" in json.loads(missing.read())

    conn.request("GET", "/api/agent-harnesses")
    unknown = conn.getresponse()
    assert unknown.status == 404 and unknown.getheader("X-Error-Code") is None and unknown.read()
    conn.close()


def test_stop_closes_idle_connections_and_keeps_repos() -> None:
    hub = LocalHub()
    hub.commit("org/kept", {"a.txt": b"a"})
    hub.start()
    conn = _http(hub)
    conn.request("GET", "/api/models/org/kept")
    assert json.loads(conn.getresponse().read())["id"] == "org/kept"
    hub.stop()
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        conn.request("GET", "/api/models/org/kept")
        conn.getresponse()
    with pytest.raises(RuntimeError):
        _ = hub.url
    hub.start()
    conn = _http(hub)
    conn.request("GET", "/api/models/org/kept/tree/main")
    assert [e["path"] for e in json.loads(conn.getresponse().read())] == ["a.txt"]
    conn.close()
    hub.stop()


# ---------------------------------------------------------------------------------------------- Python API


def test_publishing_api_validates_its_input(local_hub: LocalHub, tmp_path: Path) -> None:
    from huggingface_hub import HfApi

    repo_id = f"org/{_unique('api')}"
    with pytest.raises(ValueError, match="repo_id"):
        local_hub.commit("org/bad name", {"a": b""})
    with pytest.raises(ValueError, match="repo_type"):
        local_hub.create_repo(repo_id, repo_type="models")
    with pytest.raises(ValueError, match="file path"):
        local_hub.commit(repo_id, {"../a": b""})
    with pytest.raises(TypeError, match=r"bytes or a pathlib\.Path"):
        local_hub.commit(repo_id, {"a.txt": "text"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="not valid YAML"):
        local_hub.commit(repo_id, {"README.md": b"---\nbase_model: [unclosed\n---\n"})
    with pytest.raises(ValueError, match="base_model_relation"):
        local_hub.commit(repo_id, {"README.md": _card(base_model="org/b", base_model_relation="cousin")})
    with pytest.raises(ValueError, match="not a directory"):
        local_hub.upload_folder(repo_id, tmp_path / "absent")

    local_hub.create_repo(repo_id)  # the failed commits above did not create the repo
    with pytest.raises(ValueError, match="already exists"):
        local_hub.create_repo(repo_id)
    local_hub.create_repo(repo_id, exist_ok=True)
    sha = local_hub.commit(repo_id, {"d/a.txt": b"a", "d/b.txt": b"b", "c.txt": b"c"})
    assert len(sha) == 40 and all(ch in "0123456789abcdef" for ch in sha)
    with pytest.raises(KeyError, match=r"missing\.txt"):
        local_hub.commit(repo_id, {}, delete=["missing.txt"])
    after = local_hub.commit(repo_id, {}, delete=["d"])
    assert HfApi().list_repo_files(repo_id) == ["c.txt"]
    with pytest.raises(KeyError, match="revision"):
        local_hub.tag(repo_id, "v1", "no-such-branch")
    assert local_hub.tag(repo_id, "v1", sha) == sha
    with pytest.raises(ValueError, match="already has"):
        local_hub.tag(repo_id, "v1", after)
    with pytest.raises(ValueError, match="40-hex"):
        local_hub.tag(repo_id, "a" * 40, after)
    with pytest.raises(RuntimeError, match="start"):
        _ = LocalHub().url
