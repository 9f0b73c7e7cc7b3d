"""The documentation stays true: the generated flag page is fresh, the README is a short front door
with the three commands first, no page names one machine's paths, and the README's links resolve."""
import glob
import importlib.util
import os
import re

import pytest

from simclr.flags import SCRIPT_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
FLAGS_MD = os.path.join(ROOT, "docs", "flags.md")
README_LIMIT = 15_000
MACHINE_PATHS = ("/work/", "/root/", "/home/")


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _generator():
    spec = importlib.util.spec_from_file_location("flags_md", os.path.join(ROOT, "scripts", "flags_md.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _doc_pages():
    return [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))


def test_flags_md_is_fresh():
    assert _read(FLAGS_MD) == _generator().render(), "docs/flags.md is stale: run python scripts/flags_md.py"


def test_flags_md_check_fails_on_a_stale_file(tmp_path, capsys):
    gen = _generator()
    stale = tmp_path / "flags.md"
    stale.write_text(gen.render().replace("`--epochs`", "`--epochz`"), encoding="utf-8")
    assert gen.main(["--check", "--path", str(stale)]) == 1
    assert gen.main(["--path", str(stale)]) == 0
    assert gen.main(["--check", "--path", str(stale)]) == 0


def test_every_flag_is_in_flags_md():
    text = _read(FLAGS_MD)
    missing = []
    for script, flags in SCRIPT_FLAGS.items():
        assert f"## {script}" in text, f"no section for {script}"
        section = text.split(f"## {script}", 1)[1].split("\n## ", 1)[0]
        missing += [f"{script} --{f.name}" for f in flags if f"`--{f.name}`" not in section]
    assert not missing, f"flags missing from docs/flags.md: {missing}"


TEST_COMMAND = "python -m pytest -q -n auto"


def test_ci_runs_the_readmes_test_command():
    ci = _read(os.path.join(ROOT, ".ci", "run"))
    assert TEST_COMMAND in ci, f".ci/run does not run {TEST_COMMAND!r}, the README's test command"


def test_readme_is_short_and_starts_with_the_three_commands():
    text = _read(README)
    assert len(text) <= README_LIMIT, f"README.md has {len(text)} characters, more than {README_LIMIT}"
    blocks = re.findall(r"```[^\n]*\n(.*?)```", text, re.S)
    assert blocks, "README.md has no code block"
    first = blocks[0]
    for command in ("pip install -r requirements.txt", TEST_COMMAND,
                    "python main.py --batch_size 1024 --epochs 500"):
        assert command in first, f"the README's first code block lacks {command!r}"


@pytest.mark.parametrize("page", _doc_pages(), ids=lambda p: os.path.relpath(p, ROOT))
def test_no_machine_paths(page):
    text = _read(page)
    found = [p for p in MACHINE_PATHS if p in text]
    assert not found, f"{os.path.relpath(page, ROOT)} names one machine's paths: {found}"


def _relative_links(text):
    """Targets of Markdown links, images and HTML src/href that are not URLs or in-page anchors."""
    targets = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r"""(?:src|href)="([^"]+)\"""", text)
    return [t.split("#", 1)[0] for t in targets
            if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


@pytest.mark.parametrize("page", _doc_pages(), ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_exist(page):
    links = _relative_links(_read(page))
    if page == README:
        assert any(link.startswith("docs/") for link in links), "README.md links to no page in docs/"
    base = os.path.dirname(page)
    broken = [link for link in links if not os.path.exists(os.path.join(base, link))]
    assert not broken, f"{os.path.relpath(page, ROOT)} links to missing files: {broken}"


def _documented_columns(text: str, heading: str) -> list[str]:
    """The backticked column names that docs/files.md gives after `heading`: a table's first cells, or the
    comma-separated list after the file's name in a bullet."""
    start = text.index(heading)
    if heading.startswith("###"):
        rows = re.findall(r"^\| (`[^|]+`) \|", text[start:].split("\n\n")[1], flags=re.M)
        return [name for cell in rows for name in re.findall(r"`([^`]+)`", cell) if cell != "`column`"]
    listed = re.search(r"`([^`]+)`", text[start + len(heading):]).group(1)
    return [name.strip() for name in listed.split(",")]


def test_files_md_lists_each_csvs_columns_in_file_order():
    """docs/files.md is the public description of the CSVs: its columns are names.*_COLUMNS, in order."""
    from simclr.names import FINETUNE_COLUMNS, LINEAR_COLUMNS, PRETRAIN_COLUMNS, ORIGINAL_COLUMNS
    text = _read(os.path.join(ROOT, "docs", "files.md"))
    assert _documented_columns(text, "### `NAME_statistics.csv`") == list(PRETRAIN_COLUMNS)
    assert _documented_columns(text, "- `NAME_linear_statistics.csv`:") == list(LINEAR_COLUMNS)
    assert _documented_columns(text, "- `NAME_finetune_TAG_statistics.csv`:") == list(FINETUNE_COLUMNS)
    assert ORIGINAL_COLUMNS == ("epoch", "train_loss", "test_acc@1", "test_acc@5")  # the original tool's CSV
