"""The documentation's examples run, and say what they print.

- Every ``python`` block of every page under ``docs/`` runs on CPU tensors, the blocks of a page in order
  in one namespace (as a reader would paste them). A ``print(...)`` followed by a comment (on its line or
  the next) stating concrete values (``# True``, ``# [2, 100, 4, 32] True``) must print those values;
  comments with names or ``...`` are prose and are not checked. A block right after
  ``<!-- docs-test: skip -->`` is skipped.
- The docstring examples of the public ops and of the T2R conversion run as doctests (those of
  ``fla_gsa.modules``, the layer files and the model files run in their own test files, listed in
  ``DOCTESTED_ELSEWHERE``).
- Every public function and class of ``fla_gsa.ops``, ``.modules``, ``.layers`` and ``.models`` has a
  docstring with an example, in a module whose doctests run somewhere.
- Every page is in the site's navigation, and, when mkdocs is installed (the ``docs`` extra), the site
  builds with ``mkdocs build --strict``.
"""
from __future__ import annotations

import builtins
import contextlib
import doctest
import importlib
import inspect
import io
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PACKAGES = ["fla_gsa.ops", "fla_gsa.modules", "fla_gsa.layers", "fla_gsa.models"]

# pages whose blocks can't run here, with the reason
SKIP_PAGES = {
    "t2r.md": "converts a checkpoint downloaded from the Hugging Face hub (no network in tests)",
}
SKIP_MARK = "<!-- docs-test: skip -->"

# doctests run by this file
DOCTESTED_HERE = [
    "fla_gsa.ops.common.chunk", "fla_gsa.ops.common.fused_recurrent", "fla_gsa.ops.common.naive",
    "fla_gsa.ops.gla.chunk", "fla_gsa.ops.gla.fused_recurrent", "fla_gsa.ops.gla.naive",
    "fla_gsa.ops.gsa.chunk", "fla_gsa.ops.gsa.fused_recurrent", "fla_gsa.ops.gsa.decode", "fla_gsa.ops.gsa.naive",
    "fla_gsa.ops.gsa.inputs",
    "fla_gsa.ops.abc", "fla_gsa.ops.utils.cumsum", "fla_gsa.models.convert",
]
# doctests run by other test files (tests/modules/test_docstrings.py, tests/layers/test_layers.py,
# tests/models/test_models.py)
DOCTESTED_ELSEWHERE = [
    "fla_gsa.modules.activations", "fla_gsa.modules.convolution", "fla_gsa.modules.cross_entropy",
    "fla_gsa.modules.layernorm", "fla_gsa.modules.linear", "fla_gsa.modules.linear_cross_entropy", "fla_gsa.modules.mlp",
    "fla_gsa.modules.rotary", "fla_gsa.layers.gsa", "fla_gsa.layers.gla", "fla_gsa.layers.abc",
    "fla_gsa.layers.attn", "fla_gsa.layers.cache", "fla_gsa.models.configuration", "fla_gsa.models.modeling",
]
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# -- the pages ----------------------------------------------------------------------------------

FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(first line number, code)`` of every ``python`` fenced block, dedented (blocks may sit in tabs
    or admonitions), minus those right after the skip mark."""
    blocks = []
    for m in FENCE.finditer(text):
        if m.group("lang") not in ("python", "py"):
            continue
        before = text[:m.start()].rstrip().splitlines()
        if before and before[-1].strip() == SKIP_MARK:
            continue
        indent = len(m.group("indent"))
        body = "\n".join(line[indent:] for line in m.group("body").splitlines())
        blocks.append((text.count("\n", 0, m.start()) + 2, body))
    return blocks


def pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "_ext" not in p.parts)


def page_params():
    params = []
    for p in pages():
        rel = p.relative_to(DOCS).as_posix()
        if not python_blocks(p.read_text()):
            continue
        marks = [pytest.mark.skip(reason=SKIP_PAGES[rel])] if rel in SKIP_PAGES else []
        params.append(pytest.param(p, id=rel, marks=marks))
    return params


_SIZE = re.compile(r"torch\.Size\((\[[^\]]*\])\)")


def _normalize(text: str) -> str:
    return " ".join(_SIZE.sub(r"\1", text).replace(",", ", ").split())


def _checkable(comment: str) -> bool:
    """A comment states printed values (not prose): once shapes, quoted strings and True/False/None are
    taken out, no letters are left and it does not elide anything."""
    rest = re.sub(r"\b(True|False|None)\b", "", re.sub(r"'[^']*'", "", _SIZE.sub("", comment)))
    return "..." not in comment and not re.search(r"[A-Za-z]", rest)


def _expected_outputs(code: str) -> dict[int, str]:
    """``{line of a print: the values its comment states}``."""
    lines = code.splitlines()
    expected = {}
    for i, line in enumerate(lines):
        if not re.match(r"\s*print\(", line):
            continue
        m = re.search(r"\)\s+#\s*(.+)$", line)
        if m is None and i + 1 < len(lines):
            m = re.match(r"\s*#\s*(.+)$", lines[i + 1])
        if m and _checkable(m.group(1)):
            expected[i + 1] = m.group(1)
    return expected


@pytest.mark.skipif(INTERPRET, reason="the pages' examples run on the PyTorch backend (the default run)")
@pytest.mark.parametrize("page", page_params())
def test_page_examples(page: Path):
    namespace: dict = {"__name__": "__docs__"}
    for first_line, code in python_blocks(page.read_text()):
        name = f"{page.relative_to(ROOT)}:{first_line}"
        printed: dict[int, list[str]] = {}

        def capture(*args, sep=" ", end="\n", file=None, flush=False, _name=name):
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename != _name:
                frame = frame.f_back
            buf = io.StringIO()
            builtins.print(*args, sep=sep, end=end, file=buf)
            if frame is not None:
                printed.setdefault(frame.f_lineno, []).append(buf.getvalue().strip())

        namespace["print"] = capture
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            try:
                exec(compile(code, name, "exec"), namespace)
            except Exception as e:  # name the block in the failure
                raise AssertionError(f"the example at {name} raised {type(e).__name__}: {e}") from e
        for line, want in _expected_outputs(code).items():
            got = " ".join(printed.get(line, ["<nothing printed>"]))
            assert _normalize(got) == _normalize(want), \
                f"{name}, line {line} of the block: printed {got!r}, the comment says {want!r}"


# -- the docstrings -----------------------------------------------------------------------------

@pytest.mark.triton
@pytest.mark.parametrize("name", DOCTESTED_HERE)
def test_docstring_examples(name):
    if INTERPRET and name == "fla_gsa.models.convert":
        pytest.skip("no kernels of its own")
    module = importlib.import_module(name)
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0, f"{result.failed} of the {result.attempted} examples of {name} failed (output above)"


def public_objects() -> list:
    params = []
    for pkg_name in PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for name in pkg.__all__:
            obj = getattr(pkg, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                params.append(pytest.param(obj, id=f"{pkg_name}.{name}"))
    return params


@pytest.mark.parametrize("obj", public_objects())
def test_public_api_documented(obj):
    doc = inspect.getdoc(obj) or ""
    where = f"{obj.__module__}.{obj.__qualname__}"
    assert doc.strip(), f"{where} has no docstring"
    assert ">>>" in doc, f"{where}: its docstring has no example (an Example: section with >>> lines)"
    assert obj.__module__ in DOCTESTED_HERE + DOCTESTED_ELSEWHERE, \
        f"{where}: the doctests of {obj.__module__} run nowhere; add it to DOCTESTED_HERE in {__file__}"
    if obj.__module__.startswith("fla_gsa.ops."):
        assert "[B, T, " in doc or "[B, 1, " in doc, f"{where}: its docstring gives no argument shapes"


# -- the site -----------------------------------------------------------------------------------

def _nav_files(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [f for v in nav.values() for f in _nav_files(v)]
    return [f for item in nav for f in _nav_files(item)]


def test_every_page_in_nav():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    in_nav = _nav_files(config["nav"])
    on_disk = [p.relative_to(DOCS).as_posix() for p in pages()]
    assert sorted(set(on_disk) - set(in_nav)) == [], "pages missing from the nav of mkdocs.yml"
    assert sorted(set(in_nav) - set(on_disk)) == [], "nav entries of mkdocs.yml with no page"


@pytest.mark.skipif(INTERPRET, reason="nothing to do with the kernels")
def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    mkdocs = shutil.which("mkdocs", path=os.path.dirname(sys.executable)) or shutil.which("mkdocs")
    cmd = [mkdocs] if mkdocs else [sys.executable, "-m", "mkdocs"]
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    res = subprocess.run([*cmd, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"mkdocs build --strict failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
