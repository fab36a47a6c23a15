"""The architecture as the imports show it: the library core loads no front end, and no module imports itself
back through others (imports inside functions, made where a command needs them, and annotations aside)."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "dml"
CORE = ("dml.cohort", "dml.links", "dml.step", "dml.peer", "dml.runtime", "dml.distributed", "dml.branches",
        "dml.accuracy")
FRONT_ENDS = ("dml.data", "dml.cli", "dml.report", "dml.evaluate", "dml.engine", "dml.config", "dml.experiment",
              "dml.tune", "dml.bench", "dml.plan", "dml.graph")


def test_the_library_core_loads_no_data_reader_command_or_report():
    code = (f"import sys\nfor m in {CORE!r}:\n    __import__(m)\n"
            "print('\\n'.join(sorted(m for m in sys.modules if m.startswith('dml'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert set(CORE) <= set(loaded)
    assert [m for m in loaded if m.startswith(FRONT_ENDS)] == []


def _module_imports(path: Path) -> set[str]:
    """The dml modules a module imports when it is loaded (top level, outside `if TYPE_CHECKING:`)."""
    name = ".".join(("dml", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base.startswith("dml"):
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("dml"))
    return found


def test_the_import_graph_has_no_cycle():
    modules = {".".join(("dml", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): p
               for p in PACKAGE.rglob("*.py")}
    graph = {name: {m for m in _module_imports(path) if m in modules and m != name} for name, path in modules.items()}
    cycles = []

    def visit(name, trail):
        if name in trail:
            cycles.append(trail[trail.index(name):] + [name])
            return
        for nxt in sorted(graph[name]):
            if nxt not in done:
                visit(nxt, trail + [name])
        done.add(name)

    done = set()
    for name in sorted(graph):
        visit(name, [])
    assert cycles == []


def test_dir_lists_the_public_names_the_library_page_lists():
    import re

    import dml

    text = (PACKAGE.parents[1] / "docs" / "library.md").read_text()
    listed = text[text.index("- The public names are those of `dml` itself:"):]
    listed = set(re.findall(r"`(\w+)`", listed[:listed.index("Modules below `dml`")])) - {"dml"}
    assert listed == set(dml.__all__)
    assert set(dml.__all__) <= set(dir(dml))
    assert all(getattr(dml, name) is not None for name in dml.__all__)  # each one loads
