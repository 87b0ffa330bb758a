"""sft.hub: model cards, verified downloads from a real local HTTP server, checkpoint resolution.

Every download here goes to a threaded HTTP server on 127.0.0.1 (tests/_http_server.py); the
autouse ``no_internet`` fixture makes any other connection (or DNS lookup) fail.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import multiprocessing
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from filelock import FileLock

import scfm_tools as sft
from _http_server import FileServer
from scfm_tools.hub import (
    FAMILIES,
    CardFile,
    ChecksumError,
    DownloadError,
    ManualDownloadError,
    ModelCard,
    UnknownModelError,
    _embedded,
    _registry,
    fetch,
    fetch_file,
    file_sha256,
    load,
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(folder: Path) -> list[str]:
    """Temporary download files left in ``folder`` (lock files are expected and harmless)."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


# fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def no_internet(monkeypatch):
    """Refuse every connection and name lookup that does not stay on this machine."""
    real_connect = socket.socket.connect
    real_getaddrinfo = socket.getaddrinfo

    def is_loopback(host) -> bool:
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return host == "localhost"

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not is_loopback(address[0]):
            raise ConnectionRefusedError(f"test tried to reach the internet ({address[0]})")
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if host is not None and not is_loopback(host):
            raise socket.gaierror(f"test tried to resolve {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv(sft.hub.MIRROR_ENV, raising=False)


@pytest.fixture(autouse=True)
def registry(monkeypatch):
    """A private copy of the registry, so that cards registered by a test do not leak."""
    monkeypatch.setattr(_registry, "_REGISTRY", dict(_registry._cards()))
    monkeypatch.setattr(_registry, "_loaded", True)
    return _registry._REGISTRY


@pytest.fixture
def hub_log(caplog, monkeypatch):
    # The package logger does not propagate (it has its own handler); let caplog see it.
    monkeypatch.setattr(logging.getLogger("scfm_tools"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="scfm_tools")
    return caplog


@pytest.fixture
def payload() -> bytes:
    return np.random.default_rng(0).bytes(300_000)


@pytest.fixture
def server(tmp_path, payload):
    root = tmp_path / "served"
    root.mkdir()
    (root / "weights.bin").write_bytes(payload)
    (root / "vocab.json").write_text(json.dumps({"<pad>": 0, "CD3E": 1}))
    with FileServer(root) as srv:
        yield srv


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


def tiny_card(name: str = "tiny", **file_kwargs) -> ModelCard:
    return ModelCard(
        name=name,
        family="scgpt",
        description="a test card",
        files=(CardFile("weights.bin", role="weights", **file_kwargs),),
        source_url="https://example.org/tiny-models",
        manual_download="Ask the tiny-model authors for weights.bin.",
    )


# fetch_file --------------------------------------------------------------------------------------
def test_fetch_file_downloads_verifies_and_does_not_download_twice(server, payload, tmp_path):
    dest = tmp_path / "out" / "weights.bin"
    got = fetch_file(server.url("weights.bin"), sha256=sha(payload), path=dest)
    assert got == dest
    assert dest.read_bytes() == payload
    assert file_sha256(dest) == sha(payload)
    assert server.requests["weights.bin"] == 1
    # present with the right hash: no request at all
    fetch_file(server.url("weights.bin"), sha256="sha256:" + sha(payload).upper(), path=dest)
    assert server.requests["weights.bin"] == 1
    assert leftovers(dest.parent) == []


def test_fetch_file_refuses_hash_mismatch_and_leaves_nothing(server, payload, tmp_path):
    dest = tmp_path / "out" / "weights.bin"
    wrong = sha(b"something else")
    with pytest.raises(ChecksumError) as err:
        fetch_file(server.url("weights.bin"), sha256=wrong, path=dest)
    msg = str(err.value)
    assert wrong in msg and sha(payload) in msg  # expected and got
    assert str(dest) in msg
    assert not dest.exists()
    assert leftovers(dest.parent) == []


def test_fetch_file_broken_connection_is_not_cached_and_retry_works(server, payload, tmp_path):
    dest = tmp_path / "out" / "weights.bin"
    server.mode = "truncate"  # Content-Length larger than the body, then the connection closes
    with pytest.raises(DownloadError, match="IncompleteRead|Connection broken"):
        fetch_file(server.url("weights.bin"), sha256=sha(payload), path=dest)
    assert not dest.exists()
    assert leftovers(dest.parent) == []
    server.mode = "ok"
    fetch_file(server.url("weights.bin"), sha256=sha(payload), path=dest)
    assert dest.read_bytes() == payload
    assert server.requests["weights.bin"] == 2


def test_fetch_file_http_error_and_unreachable_host(server, payload, tmp_path):
    dest = tmp_path / "out" / "missing.bin"
    with pytest.raises(DownloadError, match="404"):
        fetch_file(server.url("missing.bin"), sha256=sha(payload), path=dest)
    with pytest.raises(DownloadError, match="internet|resolve"):
        fetch_file("https://example.org/weights.bin", sha256=sha(payload), path=dest)
    assert not dest.exists()
    assert leftovers(dest.parent) == []


def test_fetch_file_replaces_a_corrupt_copy(server, payload, tmp_path, hub_log):
    dest = tmp_path / "out" / "weights.bin"
    dest.parent.mkdir()
    dest.write_bytes(payload[:1000])
    fetch_file(server.url("weights.bin"), sha256=sha(payload), path=dest)
    assert dest.read_bytes() == payload
    assert "downloading it again" in hub_log.text


def test_fetch_file_checks_size_too(server, payload, tmp_path):
    dest = tmp_path / "out" / "weights.bin"
    with pytest.raises(ChecksumError, match=f"{len(payload)} bytes, but 12 were expected"):
        fetch_file(
            server.url("weights.bin"), sha256=None, allow_unverified=True, size=12, path=dest
        )
    assert not dest.exists()


def test_fetch_file_needs_a_hash_unless_told_otherwise(server, payload, tmp_path, hub_log):
    dest = tmp_path / "out" / "weights.bin"
    with pytest.raises(ValueError, match="allow_unverified=True"):
        fetch_file(server.url("weights.bin"), sha256=None, path=dest)
    assert server.requests["weights.bin"] == 0
    with pytest.raises(ValueError, match="64 hex digits"):
        fetch_file(server.url("weights.bin"), sha256="abc", path=dest)
    fetch_file(server.url("weights.bin"), sha256=None, allow_unverified=True, path=dest)
    assert dest.read_bytes() == payload
    assert f"its sha256 is {sha(payload)}" in hub_log.text


def test_fetch_file_copies_from_a_file_url(payload, tmp_path):
    mirror = tmp_path / "mirror dir"
    mirror.mkdir()
    (mirror / "weights.bin").write_bytes(payload)
    dest = tmp_path / "out" / "weights.bin"
    fetch_file((mirror / "weights.bin").as_uri(), sha256=sha(payload), path=dest)
    assert dest.read_bytes() == payload


def test_fetch_file_waits_for_the_lock_and_reuses_the_other_download(server, payload, tmp_path):
    """A second fetcher waits while another holds the file's lock, then uses its result."""
    dest = tmp_path / "out" / "weights.bin"
    dest.parent.mkdir()
    lock = FileLock(str(dest.parent / f".{dest.name}.lock"))
    lock.acquire()  # stands for another process in the middle of the download
    errors: list[BaseException] = []

    def worker():
        try:
            fetch_file(server.url("weights.bin"), sha256=sha(payload), path=dest)
        except BaseException as err:
            errors.append(err)

    thread = threading.Thread(target=worker)
    thread.start()
    time.sleep(0.3)
    assert thread.is_alive()  # waiting on the lock, not downloading
    assert server.requests["weights.bin"] == 0
    dest.write_bytes(payload)  # the "other process" finishes ...
    lock.release()  # ... and lets go
    thread.join(timeout=10)
    assert not thread.is_alive() and errors == []
    assert server.requests["weights.bin"] == 0  # found the verified file, no second download


def test_two_processes_fetching_the_same_file(server, payload, tmp_path):
    server.delay = 0.5  # the first download is still running when the second process starts
    dest = tmp_path / "out" / "weights.bin"
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(
            target=fetch_file,
            args=(server.url("weights.bin"),),
            kwargs={"sha256": sha(payload), "path": dest},
        )
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert dest.read_bytes() == payload
    assert server.requests["weights.bin"] == 1
    assert leftovers(dest.parent) == []


# fetch (cards) -----------------------------------------------------------------------------------
def test_fetch_card_downloads_into_the_cache_folder(server, payload, cache, registry):
    vocab = (server.root / "vocab.json").read_bytes()
    card = ModelCard(
        name="tiny-direct",
        family="scgpt",
        description="test",
        files=(
            CardFile("weights.bin", url=server.url("weights.bin"), sha256=sha(payload)),
            CardFile(
                "vocab.json", url=server.url("vocab.json"), sha256=sha(vocab), size=len(vocab)
            ),
        ),
    )
    sft.hub.register(card)
    folder = fetch("tiny-direct", cache_dir=cache)
    assert folder == cache / "tiny-direct"
    assert (folder / "weights.bin").read_bytes() == payload
    assert (folder / "vocab.json").read_bytes() == vocab
    fetch("tiny-direct", cache_dir=cache)
    assert dict(server.requests) == {"weights.bin": 1, "vocab.json": 1}


def test_fetch_uses_settings_cache_dir_by_default(server, payload, tmp_path, monkeypatch):
    monkeypatch.setenv("SCFM_TOOLS_CACHE", str(tmp_path / "env_cache"))
    card = tiny_card(url=server.url("weights.bin"), sha256=sha(payload))
    assert fetch(card) == tmp_path / "env_cache" / "tiny"
    assert sft.hub.model_dir(card) == tmp_path / "env_cache" / "tiny"


def test_manual_only_card_names_the_exact_destination(cache, registry):
    sft.hub.register(tiny_card(sha256=sha(b"x")))
    with pytest.raises(ManualDownloadError) as err:
        fetch("tiny", cache_dir=cache)
    assert isinstance(err.value, FileNotFoundError)
    msg = str(err.value)
    assert str(cache / "tiny" / "weights.bin") in msg
    assert "Ask the tiny-model authors for weights.bin." in msg
    assert "https://example.org/tiny-models" in msg


def test_file_placed_by_hand_is_verified_and_accepted(server, payload, cache, registry):
    sft.hub.register(tiny_card(sha256=sha(payload)))
    dest = cache / "tiny" / "weights.bin"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(payload[:-1])
    with pytest.raises(ChecksumError) as err:
        fetch("tiny", cache_dir=cache)
    assert str(dest) in str(err.value) and sha(payload) in str(err.value)
    dest.write_bytes(payload)
    assert fetch("tiny", cache_dir=cache) == dest.parent
    resolved = load("tiny", cache_dir=cache)
    assert resolved.files == {"weights": dest}
    assert resolved.sha256 == sha(payload)
    assert sum(server.requests.values()) == 0


def test_unverifiable_file_placed_by_hand_is_accepted_with_a_warning(payload, cache, hub_log):
    sft.hub.register(tiny_card())  # no url, no sha256
    dest = cache / "tiny" / "weights.bin"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(payload)
    assert fetch("tiny", cache_dir=cache) == dest.parent
    assert "without verifying it" in hub_log.text and str(dest) in hub_log.text
    # the sha256 recorded for uns[...]["params"] is computed from the file itself
    assert load("tiny", cache_dir=cache).sha256 == sha(payload)


def test_link_without_hash_needs_allow_unverified(server, payload, cache):
    card = tiny_card(url=server.url("weights.bin"))
    with pytest.raises(ManualDownloadError, match="allow_unverified=True"):
        fetch(card, cache_dir=cache)
    assert server.requests["weights.bin"] == 0
    folder = fetch(card, cache_dir=cache, allow_unverified=True)
    assert (folder / "weights.bin").read_bytes() == payload


def test_mirror_by_argument_and_by_environment(server, payload, cache, tmp_path, monkeypatch):
    card = tiny_card(sha256=sha(payload))  # no link of its own
    folder = fetch(card, cache_dir=cache, base_url=server.base_url + "/")
    assert (folder / "weights.bin").read_bytes() == payload
    # env mirror: <root>/<card name>/<file name>
    (server.root / "tiny").mkdir()
    shutil.copy(server.root / "weights.bin", server.root / "tiny" / "weights.bin")
    monkeypatch.setenv(sft.hub.MIRROR_ENV, server.base_url)
    fetch(card, cache_dir=tmp_path / "other_cache")
    assert server.requests == {"weights.bin": 1, "tiny/weights.bin": 1}


def test_broken_download_through_fetch_tells_what_to_do(server, payload, cache):
    card = tiny_card(url=server.url("weights.bin"), sha256=sha(payload))
    server.mode = "truncate"
    with pytest.raises(DownloadError) as err:
        fetch(card, cache_dir=cache)
    assert str(cache / "tiny" / "weights.bin") in str(err.value)
    assert not (cache / "tiny" / "weights.bin").exists()
    assert leftovers(cache / "tiny") == []
    server.mode = "ok"
    assert (fetch(card, cache_dir=cache) / "weights.bin").read_bytes() == payload


def test_official_card_offline_lists_every_file(cache):
    # cellplm's config has a direct link (blocked here), its checkpoint is manual-only
    with pytest.raises(DownloadError) as err:
        fetch("cellplm", cache_dir=cache)
    msg = str(err.value)
    for name in ("20230926_85M.config.json", "20230926_85M.best.ckpt"):
        assert str(cache / "cellplm" / name) in msg
    assert "dropbox.com" in msg and "raw.githubusercontent.com" in msg


def test_official_scgpt_card_manual_then_placed_by_hand(cache, hub_log):
    with pytest.raises(ManualDownloadError) as err:
        fetch("scgpt-human", cache_dir=cache)
    msg = str(err.value)
    for name in ("best_model.pt", "args.json", "vocab.json"):
        assert str(cache / "scgpt-human" / name) in msg
    assert "drive.google.com/drive/folders/1oWh_-ZRdhtoGQ2Fw24HP41FgLoomVo-y" in msg
    folder = cache / "scgpt-human"
    folder.mkdir(parents=True)
    for name in ("best_model.pt", "args.json", "vocab.json"):
        (folder / name).write_bytes(name.encode())
    resolved = load("scgpt-human", cache_dir=cache)
    assert resolved.family == "scgpt" and resolved.card is sft.hub.get_card("scgpt-human")
    assert resolved.files == {
        "weights": folder / "best_model.pt",
        "args": folder / "args.json",
        "vocab": folder / "vocab.json",
    }
    assert resolved.sha256 == sha(b"best_model.pt")
    assert resolved.params() == {
        "model": "scgpt-human",
        "family": "scgpt",
        "weights_sha256": sha(b"best_model.pt"),
    }
    assert resolved.config["nlayers"] == 12 and resolved.config["embsize"] == 512
    assert hub_log.text.count("without verifying it") == 3


# registry and cards ------------------------------------------------------------------------------
def test_list_models_has_one_row_per_card():
    df = sft.hub.list_models()
    assert isinstance(df, pd.DataFrame)
    assert df["name"].is_unique and len(df) == len(_registry._cards())
    assert {"scgpt-human", "scfoundation", "scbert", "cellplm"} <= set(df["name"])
    assert set(df["family"]) == set(FAMILIES)
    row = df.set_index("name").loc["scfoundation"]
    assert row["download"] == "manual" and not row["verifiable"]
    assert "non-commercial" in row["license"]
    assert list(df.columns[:3]) == ["name", "family", "description"]


def test_unknown_name_is_a_keyerror_listing_known_names():
    with pytest.raises(KeyError) as err:
        sft.hub.get_card("scgpt-mouse")
    assert isinstance(err.value, UnknownModelError)
    msg = str(err.value)
    assert msg.startswith("No model card named 'scgpt-mouse'")  # not wrapped in quotes
    assert "scgpt-human" in msg and "cellplm" in msg and "scfoundation" in msg
    with pytest.raises(UnknownModelError, match="scgpt-human"):
        fetch("scgpt-mouse")


def test_register_refuses_duplicates_unless_overwrite():
    card = tiny_card()
    assert sft.hub.register(card) is card
    assert "tiny" in set(sft.hub.list_models()["name"])
    with pytest.raises(ValueError, match="already registered.*overwrite=True"):
        sft.hub.register(tiny_card())
    with pytest.raises(ValueError, match="already registered"):
        sft.hub.register(sft.hub.get_card("scgpt-human"))
    newer = tiny_card(sha256=sha(b"new"))
    sft.hub.register(newer, overwrite=True)
    assert sft.hub.get_card("tiny") is newer
    with pytest.raises(TypeError, match="ModelCard"):
        sft.hub.register({"name": "x"})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"family": "geneformer"}, "family must be one of"),
        ({"name": "../evil"}, "names a folder"),
        ({"files": ()}, "non-empty list of CardFile"),
        ({"files": (CardFile("a.pt"), CardFile("a.pt"))}, "duplicate file names"),
        (
            {"files": (CardFile("a.pt", role="w"), CardFile("b.pt", role="w"))},
            "duplicate file roles",
        ),
    ],
)
def test_model_card_validation(kwargs, message):
    base = {"name": "ok", "family": "scgpt", "description": "", "files": (CardFile("a.pt"),)}
    with pytest.raises(ValueError, match=message):
        ModelCard(**(base | kwargs))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "sub/a.pt"}, "without folders"),
        ({"sha256": "xyz"}, "64 hex digits"),
        ({"size": -1}, "non-negative"),
        ({"url": ""}, "non-empty string"),
    ],
)
def test_card_file_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CardFile(**({"name": "a.pt"} | kwargs))


def test_card_round_trips_through_dict():
    card = sft.hub.get_card("cellplm")
    again = ModelCard.from_dict(json.loads(json.dumps(card.to_dict())))
    assert again == card
    assert again.weights.name == "20230926_85M.best.ckpt"
    with pytest.raises(ValueError, match="Unknown model card fields"):
        ModelCard.from_dict({**card.to_dict(), "revision": "main"})


def test_official_cards_match_the_published_facts(reference_dir):
    cellplm = sft.hub.get_card("cellplm")
    config = next(f for f in cellplm.files if f.role == "config")
    reference = reference_dir / "cellplm" / config.name
    # the card's hash and size are those of the official config file
    assert config.sha256 == sha(reference.read_bytes())
    assert config.size == reference.stat().st_size
    gene_list = json.loads(reference.read_text())["gene_list"]
    assert len(gene_list) == cellplm.config["out_dim"] == 19374

    scgpt = sft.hub.get_card("scgpt-human")
    assert [f.name for f in scgpt.files] == ["best_model.pt", "args.json", "vocab.json"]
    assert all(f.url is None and f.sha256 is None for f in scgpt.files)
    assert "Nature Methods" in scgpt.citation and "2024" in scgpt.citation
    assert sft.hub.get_card("scfoundation").weights.name == "models.ckpt"
    scbert = sft.hub.get_card("scbert")
    assert {f.role: f.name for f in scbert.files} == {
        "weights": "panglao_pretrain.pth",
        "gene_list": "gene_list.txt",
    }
    assert "Nature Machine Intelligence" in scbert.citation
    assert "ICLR 2024" in cellplm.citation
    for card in _registry._cards().values():
        assert card.license and card.citation and card.homepage.startswith("https://github.com/")
        if card.embedded:
            assert card.download == "embedded"
        else:
            assert card.download == "manual" and card.manual_download


# embedded models ---------------------------------------------------------------------------------
@pytest.fixture
def package_models(tmp_path, monkeypatch):
    """A stand-in for scfm_tools/data/models/ holding one embedded model with a card.json."""
    root = tmp_path / "pkg" / "data" / "models"
    folder = root / "scgpt-tiny"
    folder.mkdir(parents=True)
    files = {"best_model.pt": b"tiny weights", "args.json": b"{}", "vocab.json": b'{"<pad>": 0}'}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    card = ModelCard(
        name="scgpt-tiny",
        family="scgpt",
        description="embedded test model",
        files=tuple(
            CardFile(name, sha256=sha(data), role=role)
            for (name, data), role in zip(files.items(), ["weights", "args", "vocab"], strict=True)
        ),
    )
    (folder / "card.json").write_text(json.dumps(card.to_dict()))
    monkeypatch.setattr(_embedded, "_resource_root", lambda: root)
    monkeypatch.setattr(_registry, "_REGISTRY", {})
    monkeypatch.setattr(_registry, "_loaded", False)
    return root


def test_real_resource_root_is_inside_the_package():
    root = _embedded._resource_root()
    assert Path(str(root)).parts[-3:] == ("scfm_tools", "data", "models")
    assert all(c.embedded for c in _embedded.discover_embedded_cards())


def test_embedded_model_is_discovered_and_resolved_without_download(package_models, cache):
    card = sft.hub.get_card("scgpt-tiny")
    assert card.embedded and card.download == "embedded"
    assert "scgpt-human" in set(sft.hub.list_models()["name"])  # official cards still there
    folder = package_models / "scgpt-tiny"
    assert fetch("scgpt-tiny", cache_dir=cache) == folder
    assert not cache.exists()  # nothing copied into the cache
    resolved = load("scgpt-tiny")
    assert resolved.path == folder and resolved.family == "scgpt"
    assert resolved.files["vocab"] == folder / "vocab.json"
    assert resolved.sha256 == sha(b"tiny weights")


def test_embedded_model_damaged_or_incomplete(package_models):
    (package_models / "scgpt-tiny" / "best_model.pt").write_bytes(b"changed")
    with pytest.raises(ChecksumError, match="damaged"):
        fetch("scgpt-tiny")
    card = ModelCard(
        name="code-registered",
        family="cellplm",
        description="embedded card registered from code, files missing",
        files=(CardFile("m.best.ckpt", role="weights"),),
        embedded=True,
    )
    sft.hub.register(card)
    with pytest.raises(FileNotFoundError, match="reinstall"):
        load("code-registered")


def test_embedded_card_json_must_match_its_folder(package_models, hub_log):
    wrong = package_models / "other-name"
    wrong.mkdir()
    data = json.loads((package_models / "scgpt-tiny" / "card.json").read_text())
    (wrong / "card.json").write_text(json.dumps(data))
    (package_models / "broken").mkdir()
    (package_models / "broken" / "card.json").write_text("{not json")
    names = set(sft.hub.list_models()["name"])
    assert "scgpt-tiny" in names and "other-name" not in names and "broken" not in names
    assert "folder and the card name must match" in hub_log.text
    assert "Ignoring embedded model data/models/broken/" in hub_log.text


# load: local checkpoints -------------------------------------------------------------------------
def test_load_official_scgpt_folder(fixtures_dir):
    folder = fixtures_dir / "scgpt" / "ckpt_folder"
    resolved = load(folder)
    assert resolved.family == "scgpt" and resolved.card is None
    assert resolved.files == {
        "weights": folder / "best_model.pt",
        "args": folder / "args.json",
        "vocab": folder / "vocab.json",
    }
    assert resolved.sha256 == sha((folder / "best_model.pt").read_bytes())
    assert resolved.params()["weights_sha256"] == resolved.sha256
    assert resolved.config == {}
    # the checkpoint file alone finds its companions
    assert load(str(folder / "best_model.pt")).files == resolved.files


def test_load_cellplm_fixture(fixtures_dir):
    folder = fixtures_dir / "cellplm"
    expected = {"weights": folder / "fixture.best.ckpt", "config": folder / "fixture.config.json"}
    for path in (folder, folder / "fixture.best.ckpt", folder / "fixture.config.json"):
        resolved = load(path)
        assert resolved.family == "cellplm" and resolved.files == expected
    assert resolved.sha256 == sha(expected["weights"].read_bytes())


def test_load_scfoundation_and_scbert_fixtures(fixtures_dir):
    ckpt = fixtures_dir / "scfoundation" / "fixture_models.ckpt"
    for path in (ckpt, ckpt.parent):
        resolved = load(path)
        assert resolved.family == "scfoundation" and resolved.files == {"weights": ckpt}
    pth = fixtures_dir / "scbert" / "fixture_ckpt.pth"
    for path in (pth, pth.parent):
        resolved = load(path)
        assert resolved.family == "scbert" and resolved.files == {"weights": pth}
    assert resolved.sha256 == sha(pth.read_bytes())


def test_load_reports_missing_scgpt_files(fixtures_dir, tmp_path):
    src = fixtures_dir / "scgpt" / "ckpt_folder"
    folder = tmp_path / "my_scgpt"
    folder.mkdir()
    for name in ("best_model.pt", "vocab.json"):
        shutil.copy(src / name, folder / name)
    with pytest.raises(FileNotFoundError) as err:
        load(folder)
    assert f"The scGPT folder {folder} has best_model.pt and vocab.json but no args.json" in str(
        err.value
    )


def test_load_reports_missing_cellplm_config(fixtures_dir, tmp_path):
    shutil.copy(fixtures_dir / "cellplm" / "fixture.best.ckpt", tmp_path / "fixture.best.ckpt")
    with pytest.raises(FileNotFoundError, match=r"has fixture\.best\.ckpt but no fixture\.config"):
        load(tmp_path / "fixture.best.ckpt")


def test_load_ambiguous_or_unnamed_files_need_family(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.pth").write_bytes(b"not a pickle")  # never unpickled
    (folder / "models.ckpt").write_bytes(b"not a pickle either")
    with pytest.raises(ValueError, match=r"more than one model family.*family="):
        load(folder)
    assert load(folder, family="scbert").files == {"weights": folder / "a.pth"}
    assert load(folder, family="scfoundation").weights == folder / "models.ckpt"
    odd = tmp_path / "weights.safetensors"
    odd.write_bytes(b"\x00" * 8)
    with pytest.raises(ValueError, match="pass family="):
        load(odd)
    assert load(odd, family="scfoundation").files == {"weights": odd}
    with pytest.raises(ValueError, match="family must be one of"):
        load(odd, family="geneformer")


def test_load_errors_for_empty_folders_and_unknown_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint of a known model family"):
        load(tmp_path)
    with pytest.raises(UnknownModelError) as err:
        load("scgpt-humam")
    assert "scgpt-human" in str(err.value) and "not an existing file or folder" in str(err.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "nothing_here")
    with pytest.raises(ValueError, match="is a scgpt model, not cellplm"):
        load("scgpt-human", family="cellplm")


def test_load_scbert_folder_with_gene_list(tmp_path):
    (tmp_path / "panglao_pretrain.pth").write_bytes(b"weights")
    (tmp_path / "gene_list.txt").write_text("A1BG\nA1CF")
    resolved = load(tmp_path)
    assert resolved.family == "scbert"
    assert resolved.files == {
        "weights": tmp_path / "panglao_pretrain.pth",
        "gene_list": tmp_path / "gene_list.txt",
    }
    (tmp_path / "other.pth").write_bytes(b"more weights")
    with pytest.raises(ValueError, match=r"several scBERT checkpoints \(other\.pth"):
        load(tmp_path)


def test_load_scbert_safetensors_beside_gene_list(tmp_path):
    # The project's own scBERT weights: any <name>.safetensors, told apart by gene_list.txt.
    (tmp_path / "scbert.safetensors").write_bytes(b"weights")
    with pytest.raises(FileNotFoundError, match="no checkpoint of a known model family"):
        load(tmp_path)
    (tmp_path / "gene_list.txt").write_text("A1BG\nA1CF")
    for path in (tmp_path, tmp_path / "scbert.safetensors"):
        resolved = load(path)
        assert resolved.family == "scbert" and resolved.sha256 == sha(b"weights")
        assert resolved.files == {
            "weights": tmp_path / "scbert.safetensors",
            "gene_list": tmp_path / "gene_list.txt",
        }


def test_safetensors_scgpt_folder_resolves(tmp_path):
    folder = tmp_path / "own"
    folder.mkdir()
    for name, data in {"model.safetensors": b"w", "args.json": b"{}", "vocab.json": b"{}"}.items():
        (folder / name).write_bytes(data)
    resolved = load(folder)
    assert resolved.family == "scgpt"
    assert resolved.weights == folder / "model.safetensors"
    assert resolved.sha256 == sha(b"w")
    (folder / "args.json").unlink()
    with pytest.raises(FileNotFoundError, match="has model.safetensors and vocab.json but no args"):
        load(folder)
