"""The package layout's import rules: ``import unroll`` needs torch only; ``unroll`` never imports ``zoo`` or ``bench``,
``zoo`` never imports ``bench``; the segmentation library imports its extras where they are used."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# never pulled in by `import unroll`: the extras, the heavier torch companions, and the packages above unroll
NOT_BY_CORE = ("torchvision", "torchmetrics", "skimage", "sklearn", "matplotlib", "PIL", "rich", "zoo", "bench",
               "unroll.segmentation")


def _modules_after(code: str) -> set[str]:
    """sys.modules after running `code` in a fresh interpreter that sees this checkout first."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def _loaded(modules: set[str], name: str) -> bool:
    return name in modules or any(m.startswith(name + ".") for m in modules)


def test_import_unroll_loads_torch_only():
    modules = _modules_after("import unroll\nassert unroll.__file__.startswith(%r), unroll.__file__" % str(ROOT))
    assert "torch" in modules
    assert [name for name in NOT_BY_CORE if _loaded(modules, name)] == []


def test_segmentation_modules_import_without_zoo_bench_or_unused_extras():
    modules = _modules_after("import unroll.segmentation.train, unroll.segmentation.resolve")
    # torchmetrics (evaluate's metrics) and scikit-image (superpixels) are imported by the functions that use them
    assert [name for name in ("zoo", "bench", "torchmetrics", "skimage") if _loaded(modules, name)] == []
    modules = _modules_after("import unroll.segmentation.metrics, unroll.segmentation.wsss_metrics")
    assert [name for name in ("zoo", "bench", "skimage") if _loaded(modules, name)] == []


def _imported_packages(path: Path) -> set[str]:
    """Top-level package of every absolute import in a source file, function-level imports included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            out.add(str(node.args[0].value).split(".")[0])
    return out


@pytest.mark.parametrize("package, forbidden", [("unroll", {"zoo", "bench"}), ("zoo", {"bench"})])
def test_package_never_imports_the_layers_above(package, forbidden):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no sources under {ROOT / package}"
    bad = {str(f.relative_to(ROOT)): sorted(_imported_packages(f) & forbidden) for f in files}
    assert {f: names for f, names in bad.items() if names} == {}


def test_import_scanner_sees_nested_imports(tmp_path):
    # the scanner must see what the layout rule is about, or the test above could not fail
    src = tmp_path / "m.py"
    src.write_text("import os\ndef f():\n    from zoo.segmentation import build\n    import bench.voc as v\n"
                   "    importlib.import_module('bench.digits')\n")
    assert _imported_packages(src) == {"os", "zoo", "bench"}
