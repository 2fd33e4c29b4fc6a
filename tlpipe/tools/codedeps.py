"""Each stage's code deps in dvc.yaml, written from its imports: `make deps`.

A stage's code deps are its own module (`stages/<name>.py`) and every tlpipe module it imports,
directly or through another tlpipe module (its import closure), so that editing a module reruns
exactly the stages that run it. People write a stage's data deps; this writes the `.py` lines of
its `deps:` list, in place, keeping every other line of dvc.yaml as it is. The imports are read
from the source text (ast), never executed. A package's `__init__.py` holds only its docstring
(tests/test_architecture.py), so it is no code dep.

    python -m tlpipe.tools.codedeps            rewrite dvc.yaml's code deps
    python -m tlpipe.tools.codedeps --check    exit 1, naming the stages, if they are stale
    python -m tlpipe.tools.codedeps --reruns   each module and the stages an edit of it reruns
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CODE_DEP = re.compile(r"^\s+- (stages|tlpipe)/\S+\.py\s*$")


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The source file of a tlpipe module (not a package), or None."""
    file = root / (name.replace(".", "/") + ".py")
    return file if name.startswith("tlpipe.") and file.is_file() else None


def imports(path: Path, root: Path = ROOT) -> set[str]:
    """The tlpipe modules `path` imports itself, anywhere in it (a function-level import counts)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from tlpipe.nets import linear` imports the module tlpipe.nets.linear
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found |= {name for name in names if module_file(name, root)}
    return found


def closure(path: Path, root: Path = ROOT) -> set[str]:
    """The tlpipe modules `path` imports, directly or through one another."""
    seen: set[str] = set()
    todo = [path]
    while todo:
        for name in imports(todo.pop(), root) - seen:
            seen.add(name)
            todo.append(module_file(name, root))
    return seen


def code_deps(stage: str, root: Path = ROOT) -> list[str]:
    """`stages/<stage>.py` and the files of its import closure, as dvc.yaml lists them: the core's
    modules first, then the wings'."""
    files = [name.replace(".", "/") + ".py" for name in closure(root / "stages" / f"{stage}.py", root)]
    return [f"stages/{stage}.py"] + sorted(files, key=lambda f: (f.count("/"), f))


def rewritten(text: str, root: Path = ROOT) -> str:
    """dvc.yaml's text with each stage's code deps replaced by its import closure (first in `deps:`)."""
    out, section, stage, in_deps = [], None, None, False
    for line in text.splitlines(keepends=True):
        if re.match(r"^[^\s#]", line):  # a top-level key: stages, plots, ...
            section, stage, in_deps = line.split(":")[0], None, False
        elif section == "stages" and (m := re.match(r"^  ([\w-]+):\s*$", line)):
            stage, in_deps = m.group(1), False
        elif stage and re.match(r"^    deps:\s*$", line):
            in_deps = True
            out.append(line)
            out += [f"      - {dep}\n" for dep in code_deps(stage, root)]
            continue
        elif re.match(r"^    \w", line):  # the stage's next key ends its deps
            in_deps = False
        if in_deps and CODE_DEP.match(line):
            continue
        out.append(line)
    return "".join(out)


def stale_stages(text: str, root: Path = ROOT) -> list[str]:
    """The stages whose code deps in `text` differ from their import closure."""
    import yaml

    now = yaml.safe_load(text)["stages"]
    want = yaml.safe_load(rewritten(text, root))["stages"]
    return [name for name in now if now[name].get("deps") != want[name].get("deps")]


def reruns(text: str, root: Path = ROOT) -> dict[str, list[str]]:
    """Each tlpipe module that some stage imports -> those stages, in dvc.yaml's order."""
    import yaml

    found: dict[str, list[str]] = {}
    for stage in yaml.safe_load(text)["stages"]:
        for dep in code_deps(stage, root)[1:]:
            found.setdefault(dep, []).append(stage)
    return dict(sorted(found.items(), key=lambda item: (item[0].count("/"), item[0])))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only say whether dvc.yaml's code deps are stale")
    parser.add_argument("--reruns", action="store_true", help="list each module and the stages an edit of it reruns")
    parser.add_argument("--dvc-yaml", type=Path, default=ROOT / "dvc.yaml")
    args = parser.parse_args(argv)
    text = args.dvc_yaml.read_text()
    if args.reruns:
        for module, stages in reruns(text, args.dvc_yaml.parent).items():
            print(f"{module:32s} {len(stages):2d}  {' '.join(stages)}")
        return
    stale = stale_stages(text, args.dvc_yaml.parent)
    if args.check:
        if stale:
            sys.exit(f"{args.dvc_yaml}: the code deps of {', '.join(stale)} differ from their imports; run `make deps`")
        return
    if stale:
        args.dvc_yaml.write_text(rewritten(text, args.dvc_yaml.parent))
    print(f"{args.dvc_yaml}: code deps of {', '.join(stale) or 'no stage'} rewritten")


if __name__ == "__main__":
    main()
