"""The package's layout holds: each wing imports only what its __init__ docstring allows, imports
stand at the top of modules, and the product carries no test hooks."""
import ast

from conftest import ROOT

PACKAGE = ROOT / "ddp_trainer"
WINGS = ("launch", "data", "checkpoint", "training", "export")
TOP = ("cli", "commands", "check", "api", "__main__", "__init__")  # the entry points: may import anything
# what each part may import from the package (besides itself); "shared": the top-level helper modules
ALLOWED = {
    "shared": {"shared"},
    "launch": {"shared"},
    "data": {"shared", "launch"},
    "checkpoint": {"shared", "launch"},
    "training": {"shared", "launch", "data", "checkpoint"},
    "export": {"shared", "launch", "data", "checkpoint"},  # a checkpoint -> a file; never a run (training/)
}
MAX_LOCAL_IMPORTS = 8  # + the optional batch decoders of data.decode_device (torchcodec, its torchvision fallback), object storage for shard sets


def _part(module: str) -> str:
    """``ddp_trainer.data.samplers`` -> data; ``ddp_trainer.config`` -> shared; entry points -> top."""
    parts = module.split(".")[1:]
    if parts and parts[0] in WINGS:
        return parts[0]
    return "top" if (parts[0] if parts else "__init__") in TOP else "shared"


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts)
        is_pkg = path.name == "__init__.py"
        yield path, (name[: -len(".__init__")] if is_pkg else name), is_pkg


def _imported(module: str, is_pkg: bool, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The ddp_trainer modules an import statement names (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("ddp_trainer")]
    if node.level == 0:
        base = node.module or ""
    else:
        package = module.split(".") if is_pkg else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    if not base.startswith("ddp_trainer"):
        return []
    if node.module is None:  # from . import a, b: each is a module
        return [f"{base}.{a.name}" for a in node.names]
    return [base]


def test_each_wing_imports_only_downward_and_data_and_checkpoint_never_each_other():
    wrong = []
    for path, module, is_pkg in _modules():
        here = _part(module)
        if here == "top":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _imported(module, is_pkg, node):
                    there = _part(target)
                    if there != here and there not in ALLOWED[here]:
                        wrong.append(f"{module} ({here}) imports {target} ({there})")
    assert not wrong, "\n".join(wrong)


def test_imports_stand_at_the_top_except_a_few_with_their_reason():
    local = []
    for path, module, _ in _modules():
        lines = path.read_text().splitlines()
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        before = lines[node.lineno - 2].strip()
                        local.append((module, node.lineno, before.startswith("#")))
    assert len(local) <= MAX_LOCAL_IMPORTS, local
    assert all(reason for _, _, reason in local), f"a function-local import without a comment above it: {local}"


def test_the_product_holds_no_test_hooks():
    hooks = [f"{p.relative_to(ROOT)}:{i}" for p in PACKAGE.rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if "DDP_TRAINER_TEST_" in line]
    assert not hooks, hooks


def test_the_trainer_is_only_the_loop():
    lines = (PACKAGE / "training" / "trainer.py").read_text().splitlines()
    assert len(lines) <= 250, len(lines)
    tree = ast.parse("\n".join(lines))
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    attributes = {t.attr for n in ast.walk(trainer) if isinstance(n, (ast.Assign, ast.AnnAssign))
                  for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                  for t in (t.elts if isinstance(t, ast.Tuple) else [t])
                  if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
    assert len(attributes) <= 15, sorted(attributes)
