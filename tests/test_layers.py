"""Layers import downward only, and ``nn/`` holds no model-family code.

Every module under ``src/scfm_tools`` belongs to a layer: its top-level module or subpackage
(``models/scbert/_module.py`` is in ``models``). The tiers, bottom up; a module may import its own
layer and the layers of the tiers below it, nothing above and no peer of its own tier:

=======================================  =========================================================
tier, bottom up                          may import, besides itself
=======================================  =========================================================
``_settings``, ``_docs``, ``_h5ad``,     nothing of the package
``_metrics``, ``_errors``, ``_cell_rng``
``_anndata``, ``_progress``              the first tier (and the package's ``__version__``)
``_validation``                          ``_anndata`` and below
``_labels``                              ``_validation`` and below
``nn``                                   the private helpers above (``_settings`` ... ``_labels``)
``pp``                                   ``nn`` and below
``hub``                                  ``pp`` and below
``datasets``                             ``hub`` and below
``train``                                ``datasets`` and below
``dataloaders``                          ``train`` and below
``models``                               ``train`` and below (not ``dataloaders``)
``tl``                                   ``models`` and below
``pl``                                   ``tl`` and below
``cli``                                  ``pl`` and below
entry points: ``__main__``,              anything (the package root's ``__getattr__`` loads the
``quickstart``, the package root         subpackages lazily); nothing imports them
=======================================  =========================================================

``models`` sits beside ``dataloaders``, not above it: a model meets a data module through
:class:`scfm_tools.train.BindableDataModule`. Every import counts, also one inside a function or
under ``TYPE_CHECKING``; a module that imports by name (``importlib.import_module``) counts each
``"scfm_tools.<...>"`` string it holds as an import. ``from scfm_tools import __version__`` is
allowed everywhere because the package root imports only ``_settings`` when it loads (checked
below).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = "scfm_tools"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE

#: The tiers, bottom up.
TIERS: tuple[tuple[str, ...], ...] = (
    ("_settings", "_docs", "_h5ad", "_metrics", "_errors", "_cell_rng", "_lognorm"),
    ("_anndata", "_progress"),
    ("_validation",),
    ("_labels",),
    ("nn",),
    ("pp",),
    ("hub",),
    ("datasets",),
    ("train",),
    ("dataloaders",),
    ("models",),
    ("tl",),
    ("pl",),
    ("cli",),
)
#: Entry points above every tier ("" is the package root ``__init__``): they may import
#: anything, and nothing imports them.
ENTRY_POINTS = ("__main__", "quickstart", "")
#: Imports a layer may not make although the tiers allow them.
FORBIDDEN = {("models", "dataloaders")}
#: Names the package root defines itself, with only ``_settings`` imported.
ROOT_NAMES = {"__version__", "settings"}
#: What the package root imports when it loads.
ROOT_EAGER = {f"{PACKAGE}._settings"}
#: Words no file in ``nn/`` may contain: its layers serve every family and name none.
FAMILY_WORDS = re.compile(r"scbert|scgpt|scfoundation|xtrimogene|cellplm|gene2vec", re.IGNORECASE)

_RANK = {layer: rank for rank, tier in enumerate((*TIERS, ENTRY_POINTS)) for layer in tier}
_DYNAMIC = {"import_module", "__import__"}
_NAMED = re.compile(rf"^{PACKAGE}(\.[A-Za-z_]\w*)+(:\w+)?$")


def _module_name(path: Path, root: Path) -> tuple[str, str]:
    """Return ``(module, package)`` of a source file under the package folder ``root``."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts), ".".join(parts)
    return ".".join(parts), ".".join(parts[:-1])


def _imports(tree: ast.Module, package: str) -> list[tuple[int, str]]:
    """Every ``(line, dotted target)`` a module imports, wherever the statement is.

    ``from a import b`` gives ``a.b`` (``b`` may be a module or a name), so that
    ``from scfm_tools import models`` is told apart from ``from scfm_tools import __version__``.
    """
    found: list[tuple[int, str]] = []
    dynamic = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            dynamic |= name in _DYNAMIC
    if dynamic:
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if _NAMED.match(node.value):
                    found.append((node.lineno, node.value.split(":")[0]))
    return found


def _layer_of(target: str) -> str | None:
    """Layer a dotted import target lies in; ``None`` outside the package or a root name."""
    parts = target.split(".")
    if parts[0] != PACKAGE:
        return None
    if len(parts) == 1:
        return ""  # `import scfm_tools`: the whole package
    if parts[1] in ROOT_NAMES and len(parts) == 2:
        return None
    return parts[1]


def layer_violations(root: Path) -> list[str]:
    """Imports of every module under ``root`` that go up a layer, or to an unlisted layer."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        module, package = _module_name(path, root)
        own = module.split(".")[1] if "." in module else ""
        if own not in _RANK:
            problems.append(f"{path.relative_to(root)}: layer {own!r} is in no tier of TIERS")
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line, target in _imports(tree, package):
            layer = _layer_of(target)
            if layer is None or layer == own:
                continue
            where = f"{path.relative_to(root)}:{line} ({own or 'package root'})"
            if layer not in _RANK:
                problems.append(f"{where} imports {target}, whose layer is in no tier")
            elif own in ENTRY_POINTS:
                continue
            elif _RANK[layer] >= _RANK[own] or (own, layer) in FORBIDDEN:
                problems.append(f"{where} imports {target} from layer {layer or 'package root'}")
    return problems


def family_names_in_nn(root: Path) -> list[str]:
    """Lines of files in ``root/nn`` that name a model family."""
    hits = []
    for path in sorted((root / "nn").rglob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if FAMILY_WORDS.search(line):
                hits.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    return hits


def test_layers_import_downward_only():
    problems = layer_violations(SRC)
    assert not problems, "imports against the layer order:\n" + "\n".join(problems)


def test_nn_names_no_model_family():
    hits = family_names_in_nn(SRC)
    assert not hits, "nn/ is shared by every family; move this to models/<family>:\n" + "\n".join(
        hits
    )


def test_package_root_loads_only_settings():
    # What makes `from scfm_tools import __version__` safe at the bottom layers.
    tree = ast.parse((SRC / "__init__.py").read_text(encoding="utf-8"))
    eager = set()
    for node in tree.body:  # module level only: TYPE_CHECKING blocks and functions are not run
        if isinstance(node, ast.ImportFrom) and node.level:
            modules = [node.module] if node.module else [a.name for a in node.names]
            eager |= {f"{PACKAGE}.{m}" for m in modules}
        elif isinstance(node, ast.ImportFrom):
            eager |= {node.module} if node.module.split(".")[0] == PACKAGE else set()
        elif isinstance(node, ast.Import):
            eager |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
    assert eager == ROOT_EAGER


def _write(root: Path, files: dict[str, str]) -> Path:
    package = root / PACKAGE
    for name, text in files.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return package


def test_checker_finds_upward_lazy_and_type_only_imports(tmp_path):
    package = _write(
        tmp_path,
        {
            "__init__.py": "from ._settings import settings\n",
            "_settings.py": "from .nn import Performer\n",
            "_anndata.py": "from . import __version__\n",
            "nn/__init__.py": "from .._validation import InputError\n",
            "models/__init__.py": "",
            "models/scbert/_model.py": (
                "from typing import TYPE_CHECKING\n"
                "from ...train import TrainingMixin\n"
                "if TYPE_CHECKING:\n"
                "    from ...dataloaders import MultiFileDataModule\n"
                "def f():\n"
                "    from ...tl._label_transfer import UNASSIGNED\n"
                "    import scfm_tools.pl\n"
                "    import scfm_tools as sft\n"
            ),
            "models/_table.py": (
                "import importlib\n"
                "TABLE = {'a': 'scfm_tools.tl._annotate:annotate', 'b': 'scfm_tools.models.x'}\n"
                "def load(name):\n"
                "    return importlib.import_module(name)\n"
            ),
            "tl/__init__.py": "from ..models import SCBERT\nfrom .. import __version__\n",
            "quickstart.py": "import scfm_tools as sft\nfrom scfm_tools import tl\n",
            "extra.py": "",
        },
    )
    problems = layer_violations(package)
    joined = "\n".join(problems)
    # allowed: __version__ from the root, nn -> _validation, models -> train, tl -> models,
    # a string naming models inside models, an entry point importing the whole package
    assert len(problems) == 7, joined
    for expected in (
        "_settings.py:1 (_settings) imports scfm_tools.nn.Performer",
        "models/scbert/_model.py:4 (models) imports scfm_tools.dataloaders",  # TYPE_CHECKING
        "models/scbert/_model.py:6 (models) imports scfm_tools.tl._label_transfer",  # lazy
        "models/scbert/_model.py:7 (models) imports scfm_tools.pl",  # plain import, lazy
        "models/scbert/_model.py:8 (models) imports scfm_tools from layer package root",
        "models/_table.py:2 (models) imports scfm_tools.tl._annotate",  # imported by name
        "extra.py: layer 'extra' is in no tier",
    ):
        assert expected in joined, (expected, joined)


def test_checker_finds_family_names_in_nn(tmp_path):
    package = _write(
        tmp_path,
        {
            "nn/_performer.py": "'''Generic Performer.'''\n# the gene2vec rows of zeros\nx = 1\n",
            "nn/_attention.py": "CACHE = 'scGPT'\n",
            "models/scbert/_module.py": "'''scBERT uses gene2vec.'''\n",
        },
    )
    hits = family_names_in_nn(package)
    assert [h.split(": ")[0] for h in hits] == ["nn/_attention.py:1", "nn/_performer.py:2"]
