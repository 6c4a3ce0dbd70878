"""The documentation stays inside the repository: links resolve, references into docs/ name real
files and headings, nothing points at files a clone does not have, and the README's two commands
are the ones the project promises (fast; reads text files only)."""

import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Split so that this file does not match itself.
OUTSIDE = "shared" + "/spec"
COMMANDS = (
    "bash scripts/setup_env.sh && .venv/bin/python train.py --config configs/tiny_synthetic.py "
    "--workdir runs/tiny_synthetic",
    "bash scripts/setup_env.sh && .venv/bin/python -m pytest -q",
)
LINK = re.compile(r"!?\[[^\]]*\]\(([^()\s]+)\)")
DOC_REF = re.compile(r"\bdocs/[\w./-]+\.md(?:#[\w-]+)?")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
REPO_PATH = re.compile(r"`((?:skipclick_jax|convert_weights|bench|tests|configs|scripts|docs|\.ci)/[^`\s\[:]*)")


def _repo_files() -> list[pathlib.Path]:
    """Tracked and untracked-but-not-ignored files (git), else every file outside dot folders."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        return [ROOT / line for line in out.splitlines() if (ROOT / line).is_file()]
    except (OSError, subprocess.CalledProcessError):
        return [p for p in ROOT.rglob("*") if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]


def _text(path: pathlib.Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    return data.decode("utf-8", errors="replace")


def _markdown_files() -> list[pathlib.Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M)}


def test_slug_matches_github():
    assert slug("Main job (CPU smoke run)") == "main-job-cpu-smoke-run"
    assert slug("Released .pth files") == "released-pth-files"
    assert slug("ONNX and StableHLO export") == "onnx-and-stablehlo-export"
    assert slug("`encode_image` and the split") == "encode_image-and-the-split"


def test_nothing_refers_to_files_outside_the_repository():
    offenders = []
    for path in _repo_files():
        text = _text(path)
        if text is not None and OUTSIDE in text:
            line = next(i for i, s in enumerate(text.splitlines(), 1) if OUTSIDE in s)
            offenders.append(f"{path.relative_to(ROOT)}:{line}")
    assert not offenders, f"references to {OUTSIDE!r} (not part of the repository): {offenders}"


@pytest.mark.parametrize("doc", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    text = FENCE.sub("", doc.read_text())
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(f"{target} (no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.relative_to(ROOT)})")
    assert not broken, f"{doc.relative_to(ROOT)}: broken links: {broken}"


def test_repository_paths_named_in_docs_exist():
    """A file or folder named in backticks (`skipclick_jax/edt.py`) exists: renames show here."""
    missing = []
    for doc in _markdown_files():
        for path in REPO_PATH.findall(doc.read_text()):
            if not any(ch in path for ch in "{*<") and not (ROOT / path).exists():
                missing.append(f"{doc.relative_to(ROOT)}: {path}")
    assert not missing, f"paths named in the documentation that do not exist: {missing}"


def test_code_references_into_docs_resolve():
    """Comments and docstrings cite the design as 'docs/<file>.md#<heading>': both must exist."""
    broken = []
    for path in _repo_files():
        if path.suffix not in (".py", ".toml", ".sh", ".cfg") and path.name != "run":
            continue
        text = _text(path) or ""
        for ref in set(DOC_REF.findall(text)):
            file, _, anchor = ref.partition("#")
            dest = ROOT / file
            if not dest.is_file():
                broken.append(f"{path.relative_to(ROOT)}: {ref} (no file)")
            elif anchor and anchor not in anchors(dest):
                broken.append(f"{path.relative_to(ROOT)}: {ref} (no heading)")
    assert not broken, broken


def test_readme_holds_the_two_commands_verbatim():
    lines = (ROOT / "README.md").read_text().splitlines()
    for command in COMMANDS:
        assert command in lines, f"README.md lacks the line {command!r}"
