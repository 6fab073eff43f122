"""The package's layering: the library (``molf_ds/`` outside ``molf_ds/train/``: the optimizer and
its DeepSpeed integration, ``pip install molf-ds``) never depends on the training job
(``molf_ds/train/``, ``pip install molf-ds[train]``) nor on what only the training job needs, and
only ``molf_ds/zero.py`` and ``molf_ds/ds_partitions.py`` touch DeepSpeed.

Checked statically (every import statement in the library's source, top-level or inside a
function, and ``importlib.import_module`` / ``__import__`` with a literal name) and at runtime
(the library works in a process where the training-only packages cannot be imported).

And the documentation's layout: README.md stays short; every code block README.md or docs/*.md
quotes from examples/ is verbatim in that file; every relative link resolves (file and heading
anchor); every test the docs name exists.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "molf_ds"
TRAIN_PACKAGE = "molf_ds.train"
# The training job's own dependencies: the `train` extra in pyproject.toml (import names).
TRAINING_ONLY = ("datasets", "tensorboard", "matplotlib", "tqdm", "yaml", "pydantic")
DEEPSPEED_USERS = ("molf_ds/ds_partitions.py", "molf_ds/zero.py")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _library_files() -> list[Path]:
    train_dir = PACKAGE / "train"
    return sorted(p for p in PACKAGE.rglob("*.py") if train_dir not in p.parents)


def imports_in(source: str, module: str, is_package: bool = False) -> list[tuple[int, str, str]]:
    """Every module ``source`` (the text of ``module``) imports: (line, dotted name, statement).

    ``from a import b`` yields both ``a`` and ``a.b`` (``b`` may be a submodule); relative
    imports are resolved against ``module``'s package.
    """
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base_parts = package.split(".")
            if node.level:
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
        ):
            names = [node.args[0].value]
        if names:
            statement = " ".join((ast.get_source_segment(source, node) or "").split())
            found += [(node.lineno, name, statement) for name in names]
    return found


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _offences(predicate) -> list[str]:
    """Every import in the library for which ``predicate(file, imported name)`` holds."""
    offences = []
    for path in _library_files():
        relative = path.relative_to(REPO).as_posix()
        module = _module_name(path)
        found = imports_in(path.read_text(), module, is_package=path.name == "__init__.py")
        offences += [
            f"{relative}:{line} imports {name} (`{statement}`)"
            for line, name, statement in found
            if predicate(relative, name)
        ]
    return sorted(set(offences))


def test_the_scanner_sees_every_form_of_import():
    source = textwrap.dedent(
        """
        import molf_ds.train
        from molf_ds.train import recipe
        from molf_ds import train
        from . import train as t
        from .train.recipe import main
        import importlib
        def later():
            import tqdm.auto
            importlib.import_module("yaml")
        """
    )
    names = {name for _, name, _ in imports_in(source, "molf_ds.zero")}
    assert {"molf_ds.train", "molf_ds.train.recipe", "tqdm.auto", "yaml"} <= names
    per_line = {
        line
        for line, name, _ in imports_in(source, "molf_ds.zero")
        if _under(name, "molf_ds.train")
    }
    assert per_line == {2, 3, 4, 5, 6}, per_line
    files = {p.relative_to(REPO).as_posix() for p in _library_files()}
    assert {"molf_ds/__init__.py", *DEEPSPEED_USERS} <= files, files
    assert not any(f.startswith("molf_ds/train/") for f in files), files


def test_library_does_not_import_the_training_job():
    offences = _offences(lambda _file, name: _under(name, TRAIN_PACKAGE))
    assert not offences, (
        "the library (molf_ds/ outside molf_ds/train/) must not import the training job:\n"
        + "\n".join(offences)
    )


def test_only_zero_and_ds_partitions_import_deepspeed():
    offences = _offences(
        lambda file, name: _under(name, "deepspeed") and file not in DEEPSPEED_USERS
    )
    assert not offences, (
        f"only {' and '.join(DEEPSPEED_USERS)} may import deepspeed:\n" + "\n".join(offences)
    )


def test_library_does_not_import_training_only_packages():
    offences = _offences(lambda _file, name: any(_under(name, pkg) for pkg in TRAINING_ONLY))
    assert not offences, (
        f"the library must not import the training job's dependencies ({', '.join(TRAINING_ONLY)}"
        "; the `train` extra):\n" + "\n".join(offences)
    )


# The user's side (torch, a transformers model) is set up first: transformers itself imports tqdm
# and yaml. Then every training-only package, and whatever of it is loaded already, is blocked
# (`sys.modules[name] = None` makes any later import of it raise ImportError naming it).
WITHOUT_TRAINING_PACKAGES = """
import sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM

config = LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
)
model = LlamaForCausalLM(config)
blocked = {blocked!r}
for name in list(sys.modules):
    if name.split(".")[0] in blocked:
        sys.modules[name] = None
for name in blocked:
    sys.modules[name] = None

import molf_ds

molf_ds.wrap(model, molf_ds.MoLFConfig(lora_ranks=(4,)))
optimizer = molf_ds.MoLFAdamW(model, lr=1e-2, fused=False)
before = [p.detach().clone() for p in model.parameters()]
ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
model(input_ids=ids, labels=ids).loss.backward()
optimizer.step()
assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters())), "nothing moved"
loaded = sorted(name for name in sys.modules if name.startswith("{train}"))
assert not loaded, f"the library imported the training job: {{loaded}}"
print("ok")
"""


@pytest.mark.slow  # a subprocess
def test_library_works_without_training_only_packages():
    """`import molf_ds`, wrap a model, one MoLFAdamW step: none of it needs the `train` extra."""
    script = WITHOUT_TRAINING_PACKAGES.format(blocked=TRAINING_ONLY, train=TRAIN_PACKAGE)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", (
        f"with {', '.join(TRAINING_ONLY)} unimportable, the library must still import, wrap a "
        f"model and step MoLFAdamW:\n{result.stderr[-4000:]}"
    )


DOC_PAGES = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
README_MAX_LINES = 250
# A Python block quoted from an example file: the last line of text before it names the file.
QUOTED_BLOCK = re.compile(r"[^\n]*`examples/([\w.]+\.py)`[^\n]*:\n\n```python\n(.*?)```", re.S)


def quoted_example_blocks(text: str) -> list[tuple[str, str]]:
    """(example file, code) of every Python block that the line before it says is from
    ``examples/NAME.py`` (e.g. "From `examples/trainer_molf.py`:")."""
    return QUOTED_BLOCK.findall(text)


def test_docs_examples_are_in_the_tested_example_files():
    """Every Python block that README.md or a page of docs/ quotes from a file in examples/ is,
    verbatim, part of that file, which tests/test_hf.py runs: the docs cannot drift from what
    works."""
    quoted = {
        page.relative_to(REPO).as_posix(): quoted_example_blocks(page.read_text())
        for page in DOC_PAGES
    }
    # The README quotes the Trainer example; docs/transformers.md the Trainer and accelerate ones.
    assert {name for name, _ in quoted["README.md"]} == {"trainer_molf.py"}, quoted["README.md"]
    assert {name for name, _ in quoted["docs/transformers.md"]} == {
        "trainer_molf.py",
        "accelerate_molf.py",
    }, quoted["docs/transformers.md"]
    for page, blocks in quoted.items():
        for name, block in blocks:
            example = REPO / "examples" / name
            assert example.is_file(), f"{page} quotes examples/{name}, which does not exist"
            assert block in example.read_text(), f"{page}: not in examples/{name}:\n{block}"


def test_quoted_blocks_are_found_and_a_changed_one_is_caught():
    text = "From `examples/x.py`:\n\n```python\nprint(1)\n```\n\nOther:\n\n```python\nno\n```\n"
    assert quoted_example_blocks(text) == [("x.py", "print(1)\n")]


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped (hyphens and
    underscores kept), each space a hyphen."""
    text = re.sub(r"<[^>]+>", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _without_code(text: str) -> str:
    """``text`` without fenced code blocks and inline code spans (links there are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(text: str) -> set[str]:
    """Every heading anchor of a Markdown page (repeated headings get -1, -2, ... as on GitHub)."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    for heading in re.findall(
        r"^#{1,6} +(.+?) *#*$", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M), flags=re.M
    ):
        slug = github_slug(heading)
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def broken_links(page: Path) -> list[str]:
    """Every relative link of ``page`` whose file does not exist or whose ``#anchor`` names no
    heading of its target."""
    broken = []
    text = page.read_text()
    for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", _without_code(text)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        if not destination.exists():
            broken.append(f"{target}: no file {destination}")
        elif anchor:
            if destination.suffix != ".md":
                broken.append(f"{target}: an anchor into a file that is not Markdown")
            elif anchor not in anchors(destination.read_text()):
                broken.append(f"{target}: no heading #{anchor} in {destination.name}")
    return broken


def test_github_slugs_and_links_are_read_as_github_does(tmp_path):
    assert github_slug("The training job: `molf-train`") == "the-training-job-molf-train"
    assert (
        github_slug("Main job: where the step's time goes") == "main-job-where-the-steps-time-goes"
    )
    assert github_slug("Tasks and data (`task=`, `data=`)") == "tasks-and-data-task-data"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}
    (tmp_path / "other.md").write_text("# Other page\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Top\n[ok](other.md) [ok](other.md#other-page) [ok](#top) [web](https://x.org/a#b)\n"
        "`[code](missing.md)`\n[gone](missing.md) [bad](other.md#nowhere) [bad](#nowhere)\n"
    )
    assert [b.split(":")[0] for b in broken_links(page)] == [
        "missing.md",
        "other.md#nowhere",
        "#nowhere",
    ]


@pytest.mark.parametrize("page", DOC_PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_resolves(page):
    """Every relative link in README.md and docs/*.md names a file that exists, and a ``#anchor``
    a heading of its target (GitHub's slug)."""
    broken = broken_links(page)
    assert not broken, f"{page.relative_to(REPO)}: broken links:\n" + "\n".join(broken)


def test_readme_is_short():
    lines = len((REPO / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to a page of docs/"
    )


def named_tests(text: str) -> list[tuple[str, str]]:
    """(test file, test name) of every ``tests/FILE.py::test_name`` in ``text``; a bare
    ``::test_name`` belongs to the file named last before it (as in docs/reliability.md)."""
    named, last = [], None
    for file, name in re.findall(r"`(tests/[\w/]+\.py)?::(test_\w+)`", text):
        last = file or last
        named.append((last, name))
    return named


def test_named_tests_are_found():
    text = "`tests/a.py::test_x`, `::test_y`; `tests/b.py::test_z`"
    assert named_tests(text) == [
        ("tests/a.py", "test_x"),
        ("tests/a.py", "test_y"),
        ("tests/b.py", "test_z"),
    ]


@pytest.mark.parametrize("page", DOC_PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_test_the_docs_name_exists(page):
    """A guarantee in docs/reliability.md (or anywhere in the docs) names the test that holds it;
    that test must exist, so a renamed or deleted test cannot leave a guarantee unheld."""
    missing = [
        f"{file}::{name}"
        for file, name in named_tests(page.read_text())
        if not (REPO / file).is_file()
        or not re.search(rf"^\s*def {name}\(", (REPO / file).read_text(), flags=re.M)
    ]
    assert not missing, f"{page.relative_to(REPO)} names tests that do not exist: {missing}"
