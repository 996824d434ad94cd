"""Packages depend one way (dsl -> ir <- passes <- backends <- runtime <- cli), backends are peers, and no module
of attnc imports another in a loop. Read from the source with ast: imports inside functions count too."""
import ast
from pathlib import Path

import attnc

ROOT = Path(attnc.__file__).parent

# The layer of each top-level part of attnc: a module may import its own part or a lower layer. dsl and passes
# share a layer but may not import each other; the two backends may not import each other.
LAYERS = {
    "errors": 0, "version": 0, "index_data": 0,
    "ir": 1, "ops": 1, "normalizers": 1,
    "dsl": 2, "passes": 2,
    "backends": 3,
    "runtime": 4, "merge": 4,
    "distributed": 5, "explainer": 5, "bench": 5,
    "cli": 6, "__main__": 7,
}
IR_CORE = {"ir", "ops", "normalizers"}  # one vocabulary in a few modules: they may import each other


def module_names() -> dict[str, Path]:
    names = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("attnc"):
                target = node.module[len("attnc."):] if node.module != "attnc" else ""
            else:
                continue
            for alias in node.names:
                child = f"{target}.{alias.name}" if target else alias.name
                found.add(child if child in known else target)
        elif isinstance(node, ast.Import):
            found |= {a.name[len("attnc."):] for a in node.names if a.name.startswith("attnc.")}
    return {m for m in found if m in known and m != name}


def part(module: str) -> str:
    return module.split(".")[0]


def graph() -> dict[str, set[str]]:
    known = module_names()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_every_part_has_a_layer():
    assert {part(m) for m in module_names() if m} <= set(LAYERS)


def test_imports_go_down_only():
    upward = []
    for module, deps in graph().items():
        if not module:  # attnc/__init__: the public facade, which names everything lazily
            continue
        for dep in deps:
            if not dep:
                upward.append(f"{module} -> attnc (the facade)")
                continue
            same_part = part(dep) == part(module) or {part(dep), part(module)} <= IR_CORE
            lower = LAYERS[part(dep)] < LAYERS[part(module)]
            if module.startswith("backends.") and dep.startswith("backends."):
                own, other = module.split(".")[:2], dep.split(".")[:2]
                peer = len(other) > 1 and other[1] in ("triton", "tvm") and other != own
                if peer:
                    upward.append(f"{module} -> {dep} (backends are peers)")
                continue
            if not (same_part or lower):
                upward.append(f"{module} -> {dep}")
    assert not upward, "imports against the layering:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    g = {m: {d for d in deps if d} for m, deps in graph().items() if m}
    # package __init__ modules only re-export: an edge into one is an edge into what it imports
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for w in sorted(g.get(u, ())):
            if state.get(w) == 1:
                cycles.append(" -> ".join(stack[stack.index(w):] + [w]))
            elif w not in state:
                visit(w)
        stack.pop()
        state[u] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_upward_imports(tmp_path):
    """The ast reader resolves relative imports, so an upward one cannot hide behind dots."""
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from ...runtime.api import compile\n")
    known = {"runtime.api": Path(), "backends.tvm.m": bad}
    assert imports_of("backends.tvm.m", bad, known) == {"runtime.api"}
