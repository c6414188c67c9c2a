"""The cifar_resnet modules a stage script imports, directly or through other modules (read from the source)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "cifar_resnet"


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "cifar_resnet":
                found |= {a.name for a in node.names if (PACKAGE / f"{a.name}.py").is_file()}
            elif node.module.startswith("cifar_resnet."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("cifar_resnet.")}
    return found


def import_closure(stage_script: Path) -> set[str]:
    """Repo-relative paths of every cifar_resnet module the script needs, __init__.py included."""
    todo, seen = list(_imports(stage_script)), set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += _imports(PACKAGE / f"{name}.py")
    return {"src/cifar_resnet/__init__.py"} | {f"src/cifar_resnet/{n}.py" for n in seen}


if __name__ == "__main__":
    for script in sorted((ROOT / "stages").glob("*.py")):
        print(script.stem, sorted(import_closure(script)))
