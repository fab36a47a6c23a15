"""MkDocs hook: the example folders' READMEs and the files they link to become pages of the site in place,
so that the results and the custom-model walkthrough live in one file each, beside the code they describe."""

from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("examples/CIFAR100", "examples/custom")
SUFFIXES = {".md", ".png", ".toml", ".py"}


def on_files(files, config):
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and path.suffix in SUFFIXES:
                relative = path.relative_to(ROOT).as_posix()
                files.append(File(relative, str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files
