"""Layers import downward only: flows → pipelines → refocus → stores; prefect only in flows."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["flows", "pipelines", "refocus", "stores"]  # top to bottom
ONLY_IN = {"prefect": {"flows"}}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_imports_only_layers_below_it(layer):
    above = set(LAYERS[: LAYERS.index(layer)])
    files = sorted((REPO / layer).rglob("*.py"))
    assert files
    for path in files:
        roots = imported_roots(path)
        assert not roots & above, f"{path.relative_to(REPO)} imports upward: {roots & above}"
        for library, allowed in ONLY_IN.items():
            assert library not in roots or layer in allowed, (
                f"{path.relative_to(REPO)} imports {library}")


# the rooms ARCHITECTURE.md names for each heavy library (any import, at the top or in a function)
ROOMS = {
    "av": {"pipelines/decode.py", "pipelines/synth.py"},
    "open_clip": {"pipelines/encoder.py"},
    "transformers": {"refocus/lmm.py", "refocus/lmm_families.py", "pipelines/vlm.py",
                     "pipelines/lmm_budget.py"},
    "zarr": {"stores/features.py", "stores/reference.py"},
    "faiss": {"stores/index.py"},
}


def test_heavy_libraries_stay_in_their_rooms():
    found: dict[str, set[str]] = {library: set() for library in ROOMS}
    for layer in LAYERS:
        for path in sorted((REPO / layer).rglob("*.py")):
            roots = imported_roots(path)
            for library in ROOMS:
                if library in roots:
                    found[library].add(path.relative_to(REPO).as_posix())
    assert found == ROOMS
