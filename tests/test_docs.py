"""The documentation: the site builds strictly, its links resolve, and its examples run as written.

Examples are read from the Markdown itself, never copied. Every ```python block of a page runs, in the
page's order and in one namespace, after the page's hidden setup (an HTML comment `<!-- test setup` holding
fenced blocks, invisible on the site). A ```bash block right after `<!-- runnable -->` runs line by line in
bash, in a folder of the page's own with a tiny synthetic CIFAR-100 at ./data; there `dml` is this checkout's
command, and `dml train` (also under torchrun) gets flags appended that shrink it to one epoch of 60 images
(the documented flags still reach the parser: a renamed flag fails).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md")) + [ROOT / "README.md", ROOT / "examples" / "CIFAR100" / "README.md",
                                     ROOT / "examples" / "custom" / "README.md"]
TINY_TRAIN = "--epochs 1 --train-samples 60 --test-samples 30 --batch-size 16 --skip-checksum --no-download --no-progress"
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)
SETUP = re.compile(r"<!-- test setup\n(.*?)-->", re.S)


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def python_blocks(text: str) -> list[str]:
    """The page's hidden setup blocks (python), then its visible python blocks, in order."""
    setup = [code for hidden in SETUP.findall(text) for lang, code in FENCE.findall(hidden) if lang == "python"]
    visible = [code for lang, code in FENCE.findall(SETUP.sub("", text)) if lang == "python"]
    return setup + visible


def runnable_commands(text: str) -> list[str]:
    """The page's hidden bash setup, then every line of its ```bash blocks marked runnable."""
    setup = [code for hidden in SETUP.findall(text) for lang, code in FENCE.findall(hidden) if lang == "bash"]
    marked = re.findall(r"<!-- runnable -->\n```bash\n(.*?)```", SETUP.sub("", text), re.S)
    lines = []
    for code in setup + marked:
        for line in code.replace("\\\n", " ").splitlines():
            if line.split("#", 1)[0].strip():
                lines.append(line)
    return lines


def _workdir(tmp_path: Path, cifar_root: Path) -> tuple[Path, dict]:
    """A folder with ./data (the synthetic CIFAR-100), ./examples (this checkout's) and a `dml` on PATH."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "data").symlink_to(cifar_root)
    (work / "examples").symlink_to(ROOT / "examples")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "dml"
    wrapper.write_text(f"""#!/usr/bin/env bash
if [ "$1" = train ]; then exec "{sys.executable}" -m dml "$@" {TINY_TRAIN}; fi
exec "{sys.executable}" -m dml "$@"
""")
    wrapper.chmod(0o755)
    launcher = bin_dir / "torchrun"  # torchrun ... -m dml train: the same tiny flags
    launcher.write_text(f'#!/usr/bin/env bash\nexec "{sys.executable}" -m torch.distributed.run "$@" {TINY_TRAIN}\n')
    launcher.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT / "examples" / "custom"), "DML_MEASURE_THREADS": "0"}
    return work, env


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p.read_text())], ids=_name)
def test_the_python_examples_of_a_page_run(page, cifar_root, tmp_path, monkeypatch):
    work, env = _workdir(tmp_path, cifar_root)
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "custom"))
    for key in ("PATH", "DML_MEASURE_THREADS"):
        monkeypatch.setenv(key, env[key])
    from dml.cohort import Cohort

    namespace: dict = {"__name__": "__docs__"}
    try:
        for number, code in enumerate(python_blocks(page.read_text())):
            exec(compile(code, f"{_name(page)} python block {number}", "exec"), namespace)
    finally:  # as the end of a user's script would: a cohort left open gives torch's settings back
        for value in reversed(list(namespace.values())):
            if isinstance(value, Cohort):
                value.close()


@pytest.mark.processes  # dml commands in processes of their own
@pytest.mark.parametrize("page", [p for p in PAGES if runnable_commands(p.read_text())], ids=_name)
def test_the_runnable_commands_of_a_page_succeed(page, cifar_root, tmp_path):
    work, env = _workdir(tmp_path, cifar_root)
    for line in runnable_commands(page.read_text()):
        done = subprocess.run(["bash", "-c", line], cwd=work, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{_name(page)}: `{line}` failed:\n{done.stderr[-3000:]}"


def test_a_renamed_flag_in_a_runnable_block_fails(cifar_root, tmp_path):
    """The check above can fail: a documented command with a flag that does not exist is an error."""
    work, env = _workdir(tmp_path, cifar_root)
    done = subprocess.run(["bash", "-c", "dml train --models resnet20 --num-node 2"], cwd=work, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 2 and "unrecognized arguments: --num-node 2" in done.stderr


def test_the_site_builds_strictly(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert 'id="dml.cohort.Cohort"' in api  # the reference is generated, not an empty page
    formats = (tmp_path / "site" / "formats" / "index.html").read_text()
    assert "selected_on" in formats  # the checkpoint schema, from dml.checkpoint's docstring


def test_every_relative_link_of_the_readme_resolves():
    text = (ROOT / "README.md").read_text()
    targets = [t for t in re.findall(r"\]\(([^)#]+)\)", text) if "://" not in t]
    assert targets, "the README links into the documentation"
    assert [t for t in targets if not (ROOT / t).exists()] == []


def test_the_api_page_documents_exactly_the_public_names():
    import dml

    documented = re.findall(r"^::: dml\.[\w.]*\.(\w+)$", (DOCS / "api.md").read_text(), re.M)
    assert sorted(documented) == sorted(dml.__all__)
    for line in re.findall(r"^::: (dml\.[\w.]+)$", (DOCS / "api.md").read_text(), re.M):
        module, name = line.rsplit(".", 1)
        assert getattr(dml, name) is getattr(__import__(module, fromlist=[name]), name), line


def test_the_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150
