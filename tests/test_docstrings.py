"""The API reference page (docs/reference/api.md) is rendered from the docstrings, Google
style: every name it renders has a docstring with a summary line, documents each of its
parameters (``Args:``, or ``Attributes:`` for a dataclass or named tuple), shows an
example that runs as written with the output it shows, and ``build_quantizer`` lists
exactly the presets of the registry, each with the class it builds."""

from __future__ import annotations

import dataclasses
import doctest
import importlib
import inspect
import re
from pathlib import Path
from types import ModuleType

import pytest

import stabq
from stabq.quantizers.registry import PRESETS

ROOT = Path(__file__).resolve().parents[1]
API_PAGE = ROOT / "docs" / "reference" / "api.md"
DIRECTIVE = re.compile(r"^::: ([\w.]+)\s*$", re.MULTILINE)
SECTION = re.compile(r"^([A-Z]\w*(?: \w+)*):\s*$")
ENTRY = re.compile(r"^(\*{0,2}\w+)\s*(?:\([^)]*\))?:")
PRESET = re.compile(r"^- `([\w-]+)`: (.+)$")


def resolve(path: str) -> object:
    """The object a ``::: path`` directive renders: the longest importable module prefix,
    then attributes (``stabq.compare.compare`` is the function, not the package)."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)


def rendered() -> dict[str, object]:
    """Every function and class the API page renders, by dotted name: each ``:::`` target,
    and for a module target its public functions and classes (its ``__all__``)."""
    found: dict[str, object] = {}
    for path in DIRECTIVE.findall(API_PAGE.read_text()):
        obj = resolve(path)
        if isinstance(obj, ModuleType):
            for name in obj.__all__:
                member = getattr(obj, name)
                if inspect.isclass(member) or inspect.isfunction(member):
                    found[f"{path}.{name}"] = member
        else:
            found[path] = obj
    return found


RENDERED = rendered()


def own_doc(obj: object) -> str:
    """The object's own docstring: not a base class's, not a dataclass's generated one."""
    doc = vars(obj).get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def summary_problem(name: str, obj: object) -> str | None:
    """Why the docstring's first paragraph is not a summary sentence, or None."""
    first = " ".join(own_doc(obj).split("\n\n")[0].split())
    if not first:
        return f"{name}: no docstring"
    if first.startswith(f"{getattr(obj, '__name__', '')}("):
        return f"{name}: only the generated signature {first[:40]!r}"
    if not first.endswith("."):
        return f"{name}: the summary {first[:60]!r} is not a sentence ending in '.'"
    return None


def sections(doc: str) -> dict[str, list[str]]:
    """Google-style sections (``Args:``, ``Returns:``, ...) and their indented lines."""
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in doc.splitlines():
        if (match := SECTION.match(line)) is not None:
            current = found.setdefault(match.group(1), [])
        elif line and not line[0].isspace():
            current = None
        elif current is not None:
            current.append(line)
    return found


def entries(lines: list[str]) -> list[str]:
    """The names a section documents: its entries at the first indentation."""
    indented = [ln for ln in lines if ln.strip()]
    if not indented:
        return []
    level = min(len(ln) - len(ln.lstrip()) for ln in indented)
    at_level = [ln[level:] for ln in indented if len(ln) - len(ln.lstrip()) == level]
    return [m.group(1) for ln in at_level if (m := ENTRY.match(ln))]


def parameters(func: object) -> list[str]:
    """The parameters a caller passes, as a docstring names them (``*args``, ``**kw``)."""
    stars = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    return [
        stars.get(p.kind, "") + p.name
        for p in inspect.signature(func).parameters.values()
        if p.name not in ("self", "cls")
    ]


def expected(obj: object) -> tuple[str, list[str]]:
    """The section that must document ``obj``'s parameters, and their names."""
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj):
        return "Attributes", [f.name for f in dataclasses.fields(obj)]
    if inspect.isclass(obj) and issubclass(obj, tuple) and hasattr(obj, "_fields"):
        return "Attributes", list(obj._fields)
    if inspect.isclass(obj):
        init = obj.__init__
        own = getattr(init, "__module__", "") or ""
        return "Args", parameters(init) if own.startswith("stabq") else []
    return "Args", parameters(obj)


def undocumented(name: str, obj: object) -> list[str]:
    """Parameters missing from their section, and entries that are no parameter."""
    section, names = expected(obj)
    if not names:
        return []
    documented = entries(sections(own_doc(obj)).get(section, []))
    missing = [f"{name}: {n} not under {section}:" for n in names if n not in documented]
    return missing + [f"{name}: {section}: {n} is no parameter" for n in documented
                      if n not in names]  # fmt: skip


def methods(cls: type) -> dict[str, object]:
    """The public methods a class defines itself (the page renders those with a docstring)."""
    found = {}
    for name, member in vars(cls).items():
        func = member.__func__ if isinstance(member, classmethod | staticmethod) else member
        if not name.startswith("_") and inspect.isfunction(func):
            found[name] = func
    return found


def method_problems(name: str, cls: type) -> list[str]:
    """A method whose docstring has an ``Args:`` section documents every parameter."""
    problems = []
    for method, func in methods(cls).items():
        if "Args" in sections(own_doc(func)):
            problems += undocumented(f"{name}.{method}", func)
    return problems


def run_examples(name: str, obj: object) -> tuple[int, int, str]:
    """``(failed, attempted, report)`` of the doctests in ``obj``'s docstrings (its
    methods' too), each run in a fresh namespace."""
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in doctest.DocTestFinder().find(obj, name, globs={}):
        runner.run(test, out=report.append)
    failed, attempted = runner.summarize(verbose=False)
    return failed, attempted, "".join(report)


def listed_presets(doc: str) -> dict[str, str]:
    """The presets a docstring lists as ``- `name`: meaning`` (continuation lines joined)."""
    found: dict[str, str] = {}
    last = None
    for line in inspect.cleandoc(doc).splitlines():
        if (match := PRESET.match(line)) is not None:
            last = match.group(1)
            found[last] = match.group(2)
        elif last is not None and line.startswith("  ") and not line.startswith("    "):
            found[last] += " " + line.strip()
        else:
            last = None
    return found


def preset_problems(doc: str) -> list[str]:
    """Where the listed presets differ from the registry, or name another class."""
    listed = listed_presets(doc)
    problems = [] if list(listed) == list(PRESETS) else [f"listed {list(listed)}"]
    for name, meaning in listed.items():
        built = PRESETS[name][0].__name__ if name in PRESETS else None
        if built is not None and f"`{built}`" not in meaning:
            problems.append(f"{name}: {meaning!r} does not name {built}")
    return problems


def test_the_page_renders_every_public_name():
    shown = {id(obj) for obj in RENDERED.values()}
    public = [n for n in stabq.__all__ if n != "__version__"]
    assert [n for n in public if id(getattr(stabq, n)) not in shown] == []
    assert len(RENDERED) >= len(public)


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_each_name_has_a_summary_line(name):
    assert summary_problem(name, RENDERED[name]) is None


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_each_parameter_is_documented(name):
    obj = RENDERED[name]
    problems = undocumented(name, obj)
    if inspect.isclass(obj):
        problems += method_problems(name, obj)
    assert problems == []


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_each_example_runs_and_shows_its_output(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    obj = RENDERED[name]
    assert ">>>" in "".join(sections(own_doc(obj)).get("Examples", [])), f"{name}: no Examples:"
    failed, attempted, report = run_examples(name, obj)
    assert attempted > 0 and failed == 0, report


def test_build_quantizer_lists_the_registry_presets():
    assert preset_problems(stabq.build_quantizer.__doc__) == []
    assert list(listed_presets(stabq.build_quantizer.__doc__)) == stabq.preset_names()


def test_the_package_docstring_points_to_what_exists():
    doc = stabq.__doc__
    named = re.findall(r"[\w./-]+\.md\b", doc)
    assert [n for n in named if not (ROOT / n).exists()] == []
    assert "``docs``" in doc and (ROOT / "docs" / "reference" / "api.md").is_file()
    assert re.search(r"^docs:", (ROOT / "Makefile").read_text(), re.MULTILINE)


def test_the_checks_catch_what_they_are_for():
    def bare(x, *rest, depth=1, **options):
        """Do a thing.

        Args:
            x: the input.
            depth: how deep.
            ghost: no such parameter.
        """

    assert undocumented("bare", bare) == [
        "bare: *rest not under Args:",
        "bare: **options not under Args:",
        "bare: Args: ghost is no parameter",
    ]
    assert summary_problem("bare", bare) is None
    bare.__doc__ = "no sentence"
    assert summary_problem("bare", bare) is not None

    @dataclasses.dataclass
    class Config:
        lr: float = 0.1

    assert summary_problem("Config", Config) is not None  # only the generated signature
    assert undocumented("Config", Config) == ["Config: lr not under Attributes:"]
    assert run_examples("wrong", _wrong_example)[:2] == (1, 1)
    doc = stabq.build_quantizer.__doc__
    assert preset_problems(doc.replace("- `pq`:", "- pq:")) != []  # one left out
    assert preset_problems(doc.replace("`SimVQ`, 1024", "`FSQ`, 1024")) != []  # another class


def _wrong_example():
    """An example whose shown output is wrong.

    Examples:
        >>> 1 + 1
        3
    """
