import logging
import subprocess
import sys

import pytest

import scfm_tools as sft
from scfm_tools._settings import SftSettings


def test_top_level_namespace_and_version():
    for name in ("pp", "tl", "pl", "models", "hub", "datasets", "settings"):
        assert hasattr(sft, name), name
    assert isinstance(sft.__version__, str) and sft.__version__[0].isdigit()


def test_import_is_lazy():
    # torch, scvi and lightning are slow to import: `import scfm_tools` must not pull them in.
    code = (
        "import sys, scfm_tools as sft; sft.pp; sft.hub; sft.datasets; sft.tl; sft.pl; "
        "print(sorted(m for m in ('torch', 'scvi', 'lightning') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_cache_dir_env_and_override(monkeypatch, tmp_path):
    s = SftSettings()
    monkeypatch.setenv("SCFM_TOOLS_CACHE", str(tmp_path / "envcache"))
    assert s.cache_dir == tmp_path / "envcache"
    s.cache_dir = tmp_path / "explicit"
    assert s.cache_dir == tmp_path / "explicit"
    s.cache_dir = None
    assert s.cache_dir == tmp_path / "envcache"
    monkeypatch.delenv("SCFM_TOOLS_CACHE")
    assert "scfm_tools" in str(s.cache_dir)


def test_data_dir_env(monkeypatch, tmp_path):
    s = SftSettings()
    monkeypatch.delenv("SCFM_TOOLS_DATA", raising=False)
    assert s.data_dir is None
    monkeypatch.setenv("SCFM_TOOLS_DATA", str(tmp_path))
    assert s.data_dir == tmp_path


def test_device_auto_picks_cpu_here_and_logs(caplog):
    torch = pytest.importorskip("torch")
    s = SftSettings()
    s.verbosity = "info"
    logger = logging.getLogger("scfm_tools")
    logger.propagate = True
    try:
        with caplog.at_level(logging.INFO, logger="scfm_tools"):
            dev = s.resolve_device()
    finally:
        logger.propagate = False
        sft.settings.verbosity = sft.settings.verbosity  # restore the shared logger level
    expected = "cuda" if torch.cuda.is_available() else dev.type
    assert dev.type == expected
    assert any("picked" in r.getMessage() for r in caplog.records)
    assert s.resolve_device("cpu") == torch.device("cpu")


def test_device_cuda_unavailable_is_clear():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available on this machine")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        SftSettings().resolve_device("cuda")


def test_threads_are_passed_to_torch():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    s = SftSettings()
    try:
        s.n_threads = 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="positive integer"):
        s.n_threads = 0


@pytest.mark.parametrize(
    ("value", "level"), [(0, logging.ERROR), ("warning", logging.WARNING), (3, logging.DEBUG)]
)
def test_verbosity_sets_logger_level(value, level):
    s = SftSettings()
    old = logging.getLogger("scfm_tools").level
    try:
        s.verbosity = value
        assert logging.getLogger("scfm_tools").level == level
    finally:
        logging.getLogger("scfm_tools").setLevel(old)
    with pytest.raises(ValueError, match="verbosity"):
        s.verbosity = "loud"


def test_seed_validation_and_resolution():
    from scfm_tools._anndata import resolve_seed

    old = sft.settings.seed
    try:
        sft.settings.seed = 7
        assert resolve_seed(None) == 7
        assert resolve_seed(3) == 3
    finally:
        sft.settings.seed = old
    with pytest.raises(ValueError, match="non-negative"):
        sft.settings.seed = -1
    with pytest.raises(TypeError):
        resolve_seed("3")


@pytest.mark.parametrize(
    ("given", "first", "expected"),
    [
        ({}, "", "10000"),  # nobody chose: a short spin before OpenMP workers sleep
        ({"GOMP_SPINCOUNT": "500"}, "", "500"),  # the user's choice stays
        ({"OMP_WAIT_POLICY": "active"}, "", None),  # a chosen policy is left alone
        ({}, "import torch; ", None),  # torch already loaded: too late to choose, left alone
    ],
)
def test_import_shortens_the_openmp_spin_only_when_nobody_has_chosen(given, first, expected):
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(given)
    code = f"{first}import os, scfm_tools; print(os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == str(expected)
