"""The package's shape, checked from its source with `ast`: no import cycles, no private names imported from
another module, imports flowing one way through the stages, small modules, and a tile job that never loads torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "wsi_pipeline"

# Stage order: a module may import its own layer and lower ones only.
LAYERS = {
    "errors": 0,
    "layout": 0,
    "io": 0,
    "machine": 0,
    "devices": 0,
    "synthetic": 0,
    "slide": 1,
    "tiling": 2,
    "encoders": 3,
    "encode": 4,
    "mil": 5,
    "explain": 6,
    "report": 7,
    "config": 8,
    "run_settings": 8,
    "cli": 9,
    "__main__": 10,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names) for every import in the file, relative ones resolved, at any depth."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
    return found


def package_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        for target, names in imports_of(path):
            if not target.startswith("wsi_pipeline"):
                continue
            # `from pkg import module` imports the submodule; `from module import name` the module itself
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            for dep in subs or ([target] if target in modules else []):
                if dep != mod:
                    graph[mod].add(dep)
    return graph


def test_no_import_cycles() -> None:
    graph = package_graph()
    # `pkg/__init__` importing its own submodules is how a package exposes them; not a cycle between modules.
    edges = {m: {d for d in deps if not m == d.rpartition(".")[0]} for m, deps in graph.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep) :] + [dep] if dep in stack else [node, dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_names_across_modules() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for target, names in imports_of(path):
            if target.startswith("wsi_pipeline"):
                offenders += [
                    f"{module_name(path)}: {target}.{n}" for n in names if n.startswith("_") and n != "__version__"
                ]
    assert not offenders, offenders


def test_imports_flow_one_way_through_the_stages() -> None:
    def layer(mod: str) -> int:
        top = mod.split(".")[1] if "." in mod else ""
        return LAYERS.get(top, -1)

    backwards = [
        f"{m} -> {d}" for m, deps in package_graph().items() for d in deps if layer(m) >= 0 and layer(d) > layer(m)
    ]
    assert not backwards, backwards


def test_modules_stay_small() -> None:
    big = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not big, f"modules over 400 lines: {big}"


def test_only_the_cli_imports_typer() -> None:
    users = [
        module_name(p)
        for p in PACKAGE.rglob("*.py")
        if any(t == "typer" or t.startswith("typer.") for t, _ in imports_of(p))
        and not module_name(p).startswith("wsi_pipeline.cli")
    ]
    assert not users, f"typer imported outside wsi_pipeline.cli: {users}"


@pytest.mark.parametrize("argv", [["tile", "--help"], ["--help"]])
def test_light_commands_load_no_heavy_library(argv: list[str]) -> None:
    """What a tile job loads: never torch, transformers or scikit-learn (seconds and ~800 MB per slide)."""
    code = (
        "import sys\nfrom wsi_pipeline.cli import app\n"
        "from wsi_pipeline.config import load_config\nfrom wsi_pipeline.tiling.stage import tile_slide\n"
        "load_config(None)\n"
        f"sys.argv = ['wsi-pipeline', *{argv!r}]\n"
        "try:\n    app()\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'sklearn', 'timm', 'open_clip') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out, out


def test_a_tile_run_loads_only_what_tiling_uses(tmp_path: Path) -> None:
    """A real `wsi-pipeline tile` run (the command every slide of a cohort pays for): no torch, transformers or
    scikit-learn, and not zarr, dask, pandas or the composed config either (the tile table is written without zarr,
    io/small_zarr.py; the defaults come from the tiling models)."""
    from wsi_pipeline.synthetic import write_synthetic_slide

    slide = write_synthetic_slide(tmp_path / "s.svs", width=2048, height=1536).path
    cmd = [sys.executable, "-X", "importtime", "-m", "wsi_pipeline", "tile", str(slide), "--out", str(tmp_path / "r")]
    run = subprocess.run(cmd, capture_output=True, text=True, check=True)
    loaded = {line.split("|")[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert "tifffile" in loaded and "cv2" in loaded  # the parse worked: these are what tiling uses
    unwanted = ("torch", "transformers", "sklearn", "timm", "zarr", "dask", "pandas", "wsi_pipeline.config")
    assert not [m for m in unwanted if m in loaded], sorted(m for m in unwanted if m in loaded)
    assert (tmp_path / "r" / "tiles" / "s.zarr" / "zarr.json").is_file()
