"""The package's architecture, checked from the source text (no imports of the modules).

* No import circle inside ``ep_comm``: layers import downwards only (public API -> backends ->
  runtime -> core), so any module can be imported alone and a reader can follow one direction.
* No module imports another module's private (``_``-prefixed) names: what a module shares is
  public, what it keeps is its own.
* Every ``EP_*`` constant the CUDA sources read is defined in ``ep_comm.core.constants`` and every
  constant defined there for the device is read by some source (one source of truth, no dead
  entries).
"""
from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "ep_comm"
KERNELS = ROOT / "kernels"


def _module_name(path: pathlib.Path) -> str:
    """``ep_comm/a/b.py`` -> ``ep_comm.a.b``; ``kernels/triton/x.py`` -> ``ep_comm.kernels.triton.x``
    (the kernels folder is installed as ``ep_comm.kernels``)."""
    if path.is_relative_to(KERNELS):
        parts = ("ep_comm", "kernels") + path.relative_to(KERNELS).with_suffix("").parts
    else:
        parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> dict[str, pathlib.Path]:
    files = list(PKG.rglob("*.py")) + list(KERNELS.rglob("*.py"))
    return {_module_name(p): p for p in files if "__pycache__" not in p.parts}


MODULES = _sources()


def _imports(name: str, path: pathlib.Path):
    """(imported module, imported names) for every ``ep_comm`` import of a module, at any depth
    (imports inside functions count: they run too). ``from pkg import sub`` resolves to the
    submodule when ``sub`` is one."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("ep_comm"):
                    yield a.name, []
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([mod] if mod else []))
            if not mod.startswith("ep_comm"):
                continue
            plain = []
            for a in node.names:
                sub = f"{mod}.{a.name}"
                if sub in MODULES:
                    yield sub, []
                else:
                    plain.append(a.name)
            if plain:
                yield mod, plain


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        deps = set()
        for mod, _ in _imports(name, path):
            # importing a.b.c runs a and a.b first, but a package importing its own submodules
            # is how packages re-export: only the module itself is an edge
            if mod in MODULES and mod != name:
                deps.add(mod)
        graph[name] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_package_has_the_layer_folders():
    for folder in ("core", "backends", "backends/kernels", "runtime", "moe", "tools"):
        assert (PKG / folder / "__init__.py").is_file(), folder
    public = {p.name for p in PKG.glob("*.py")}
    assert public <= {"__init__.py", "buffer.py", "config.py", "handles.py", "event.py",
                      "errors.py", "autograd.py", "doctor.py", "elastic.py"}, public


def test_no_import_circle_inside_ep_comm():
    cycle = _cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_private_names_of_another():
    bad = []
    for name, path in MODULES.items():
        for mod, names in _imports(name, path):
            for n in names:
                if n.startswith("_") and not n.startswith("__") and mod != name:
                    bad.append(f"{name} imports {mod}.{n}")
    assert not bad, bad


def test_lower_layers_never_import_upper_ones():
    """core imports nothing above it; runtime only core and errors; backends not the Buffer."""
    rank = {"ep_comm.core": 0, "ep_comm.runtime": 1, "ep_comm.backends": 2, "ep_comm.moe": 2}
    allowed_everywhere = {"ep_comm.errors", "ep_comm.handles", "ep_comm.event"}
    bad = []
    for name, path in MODULES.items():
        layer = next((k for k in rank if name == k or name.startswith(k + ".")), None)
        if layer is None:
            continue
        for mod, _ in _imports(name, path):
            if mod in allowed_everywhere or mod.startswith("ep_comm.kernels"):
                continue
            target = next((k for k in rank if mod == k or mod.startswith(k + ".")), None)
            if target is None:
                # the public API layer (Buffer, Config, ...): only the backends may build a
                # Config type for their launch geometry
                if not (layer == "ep_comm.backends" and mod == "ep_comm.config"):
                    bad.append(f"{name} -> {mod}")
            elif rank[target] > rank[layer]:
                bad.append(f"{name} -> {mod}")
    assert not bad, bad


def _device_constants_used() -> set[str]:
    used = set()
    for p in (KERNELS / "cuda").glob("*.cu*"):
        used |= set(re.findall(r"\bEP_([A-Z0-9_]+)\b", p.read_text()))
    return used


def test_every_device_constant_comes_from_core_constants():
    from ep_comm.core.constants import DEVICE_CONSTANTS
    # names of macros the sources define themselves (argument lists, kernel prologues)
    local = set()
    for p in (KERNELS / "cuda").glob("*.cu*"):
        local |= set(re.findall(r"#define\s+EP_([A-Z0-9_]+)", p.read_text()))
    used = _device_constants_used() - local
    assert used <= set(DEVICE_CONSTANTS), sorted(used - set(DEVICE_CONSTANTS))
    assert set(DEVICE_CONSTANTS) <= used, sorted(set(DEVICE_CONSTANTS) - used)


@pytest.mark.parametrize("name", ["kMaxRanks", "kMaxChannels", "kMaxLocalExperts", "kWarps",
                                  "kStatusTimeout", "kInfoNumRecv"])
def test_headers_read_limits_from_the_defines_not_literals(name):
    text = (KERNELS / "cuda" / "intranode_common.cuh").read_text()
    m = re.search(rf"constexpr \w+ {name} = ([^;]+);", text)
    assert m and m.group(1).startswith("EP_"), (name, m and m.group(1))
