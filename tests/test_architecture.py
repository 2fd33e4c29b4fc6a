"""The package's layout holds: arrows point down (wing -> core, never core -> wing, no wing cycles),
package `__init__` files are docstrings only, and `make deps` writes exactly the import closure."""

import ast
import textwrap
from pathlib import Path

import pytest

from tlpipe.tools import codedeps

ROOT = codedeps.ROOT
# What each wing may import besides the core (each wing's __init__ docstring says the same).
MAY_IMPORT = {
    "ingest": set(),
    "nets": {"ingest"},
    "train": {"ingest", "nets"},
    "deploy": {"ingest", "nets"},
    "report": {"ingest"},
    "tools": {"ingest", "nets", "train", "deploy", "report"},
}


def place(module: str) -> str:
    """'core' for tlpipe.<module>, the wing's name for tlpipe.<wing>.<module>."""
    parts = module.split(".")
    return "core" if len(parts) == 2 else parts[1]


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts): p
            for p in sorted((ROOT / "tlpipe").rglob("*.py")) if p.name != "__init__.py"}


def arrows() -> dict[tuple[str, str], list[str]]:
    """(from place, to place) -> the imports that make that arrow, 'a -> b' each."""
    found: dict[tuple[str, str], list[str]] = {}
    for name, path in modules().items():
        for target in sorted(codedeps.imports(path)):
            if place(target) != place(name):
                found.setdefault((place(name), place(target)), []).append(f"{name} -> {target}")
    return found


def test_every_module_is_in_the_core_or_a_known_wing():
    assert {place(m) for m in modules()} == {"core"} | set(MAY_IMPORT)
    assert sorted(p.name for p in (ROOT / "tlpipe").iterdir() if p.is_dir() and p.name != "__pycache__") == \
        sorted(MAY_IMPORT)


def test_arrows_point_down():
    found = arrows()
    # printed for `pytest -s`: the wing graph, with how many imports make each arrow
    for (a, b), why in sorted(found.items()):
        print(f"{a:>6} -> {b:<6} {len(why):3d} imports")
    up = [i for (a, b), why in found.items() if a == "core" for i in why]
    assert up == [], "the core imports a wing"
    sideways = [i for (a, b), why in found.items() if a != "core" and b != "core" and b not in MAY_IMPORT[a]
                for i in why]
    assert sideways == [], "a wing imports a wing it may not"


def test_the_wings_form_no_cycle():
    edges = {(a, b) for a, b in arrows() if "core" not in (a, b)}
    order, left = [], set(MAY_IMPORT)
    while left:
        leaves = {w for w in left if not any(a == w and b in left for a, b in edges)}
        assert leaves, f"a cycle among {sorted(left)}"
        order += sorted(leaves)
        left -= leaves
    print("from the ground up: core, " + ", ".join(order))


def test_no_module_imports_a_stage_and_no_stage_another():
    for path in [*modules().values(), *sorted((ROOT / "stages").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            assert not any(n == "stages" or n.startswith("stages.") for n in names), path


@pytest.mark.parametrize("package", ["tlpipe", *(f"tlpipe/{w}" for w in MAY_IMPORT)])
def test_package_inits_hold_only_their_docstring(package):
    # so that they are no code deps (codedeps), and the docstring says what the package holds
    body = ast.parse((ROOT / package / "__init__.py").read_text()).body
    assert len(body) == 1 and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)
    doc = body[0].value.value
    assert "import" in doc.lower()  # says what it may import: for a wing, the wings of MAY_IMPORT
    wing = package.partition("/")[2]
    assert all(f"`{w}`" in doc for w in MAY_IMPORT.get(wing, ())) or "any wing" in doc


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))


def test_make_deps_writes_the_import_closure_and_keeps_every_other_line(tmp_path):
    write(tmp_path, {
        "stages/a.py": "from tlpipe import io\nfrom tlpipe.w import x\n",
        "stages/b.py": "def main():\n    import tlpipe.w.y\n",
        "tlpipe/io.py": "",
        "tlpipe/w/x.py": "from tlpipe.w.y import f  # through another module\n",
        "tlpipe/w/y.py": "import os\n",
        "tlpipe/w/z.py": "",  # imported by no stage
    })
    (tmp_path / "dvc.yaml").write_text(textwrap.dedent("""\
        # a comment
        stages:
          a:
            cmd: python -m stages.a
            deps:
              - tlpipe/w/z.py
              - data/in  # a data dep
            outs: [out]
          b:
            cmd: python -m stages.b
            deps:
              - stages/b.py
            params: [seed]
        plots:
          - out/x.csv
        """))
    assert codedeps.code_deps("a", tmp_path) == ["stages/a.py", "tlpipe/io.py", "tlpipe/w/x.py", "tlpipe/w/y.py"]
    assert codedeps.stale_stages((tmp_path / "dvc.yaml").read_text(), tmp_path) == ["a", "b"]
    codedeps.main(["--dvc-yaml", str(tmp_path / "dvc.yaml")])
    assert (tmp_path / "dvc.yaml").read_text() == textwrap.dedent("""\
        # a comment
        stages:
          a:
            cmd: python -m stages.a
            deps:
              - stages/a.py
              - tlpipe/io.py
              - tlpipe/w/x.py
              - tlpipe/w/y.py
              - data/in  # a data dep
            outs: [out]
          b:
            cmd: python -m stages.b
            deps:
              - stages/b.py
              - tlpipe/w/y.py
            params: [seed]
        plots:
          - out/x.csv
        """)
    codedeps.main(["--check", "--dvc-yaml", str(tmp_path / "dvc.yaml")])  # fresh now
    assert codedeps.reruns((tmp_path / "dvc.yaml").read_text(), tmp_path) == {
        "tlpipe/io.py": ["a"], "tlpipe/w/x.py": ["a"], "tlpipe/w/y.py": ["a", "b"]}
    (tmp_path / "tlpipe/w/y.py").write_text("from tlpipe.w import z\n")
    with pytest.raises(SystemExit, match=r"code deps of a, b differ from their imports; run `make deps`"):
        codedeps.main(["--check", "--dvc-yaml", str(tmp_path / "dvc.yaml")])
