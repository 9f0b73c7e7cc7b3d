"""The house rules that keep the code readable, checked on the source: no file imports a script, calls of the
project's own functions with more than three arguments name them, and Flag takes keywords after its help."""
import ast
import glob
import os

import pytest

from simclr.flags import Flag

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"main", "linear", "finetune", "neighbors", "embed", "plot", "bench", "sweep", "export_images", "hubconf"}
# the one wide call that cannot take keywords: torch.autograd.Function.apply is positional only
POSITIONAL_ONLY = {"_PerViewBatchNormFunction.apply"}


def _sources() -> dict[str, ast.Module]:
    """Every project file that is not a test: the package, the root's files and scripts/."""
    paths = (glob.glob(os.path.join(ROOT, "simclr", "**", "*.py"), recursive=True)
             + glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "scripts", "*.py")))
    trees = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            trees[os.path.relpath(path, ROOT)] = ast.parse(f.read())
    return trees


def _project_functions(trees: dict[str, ast.Module]) -> set[str]:
    """Names of the functions, methods and classes the project defines, but those taking *args (mix_seed(*parts)
    is positional by nature)."""
    defs = [node for tree in trees.values() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    variadic = {node.name for node in defs if not isinstance(node, ast.ClassDef) and node.args.vararg}
    return {node.name for node in defs} - variadic


def _called_name(call: ast.Call) -> str | None:
    """f(...) -> 'f'; module.f(...) / self.f(...) -> 'f'; None for anything else (a call of a call's result)."""
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def _script_imports(trees: dict[str, ast.Module]) -> list[str]:
    """'FILE: imports SCRIPT' for every import of a root script."""
    found = []
    for name, tree in trees.items():
        for node in ast.walk(tree):
            modules = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                       else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            found += [f"{name}: imports {m}" for m in modules if m and m.split(".")[0] in SCRIPTS]
    return found


def _wide_calls(trees: dict[str, ast.Module]) -> list[str]:
    """'FILE:LINE: f with N positional' for every call of a project function with more than three positional
    arguments."""
    ours = _project_functions(trees)
    wide = []
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or len(node.args) <= 3 or any(
                    isinstance(a, ast.Starred) for a in node.args):
                continue
            if _called_name(node) in ours and ast.unparse(node.func) not in POSITIONAL_ONLY:
                wide.append(f"{name}:{node.lineno}: {ast.unparse(node.func)} with {len(node.args)} positional")
    return wide


def test_no_file_imports_a_script():
    offenders = _script_imports(_sources())
    assert not offenders, offenders


def test_wide_calls_of_the_projects_functions_name_their_arguments():
    wide = _wide_calls(_sources())
    assert not wide, wide


def test_the_checks_see_a_wide_call_and_a_script_import():
    """The two source checks above find what they look for (so their silence means something)."""
    tree = ast.parse("import main\nfrom plot import x\n\ndef f(a, b, c, d):\n    pass\n\n"
                     "def g(*parts):\n    pass\n\nf(1, 2, 3, 4)\nf(1, 2, 3, d=4)\ng(1, 2, 3, 4)\n")
    assert _wide_calls({"x.py": tree}) == ["x.py:10: f with 4 positional"]
    assert _script_imports({"x.py": tree}) == ["x.py: imports main", "x.py: imports plot"]


def test_flag_takes_keywords_after_its_help():
    assert Flag("x", 1, "a number", type=int, group="run").type is int
    with pytest.raises(TypeError):
        Flag("x", 1, "a number", int)
