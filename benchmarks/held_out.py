"""Held-out domains: real text on this machine that no builtin domain draws from, to
judge the default method on text it was not chosen on (issue 20).

    python benchmarks/held_out.py [--out data/held-out]

writes one folder of .txt files per domain (a `text:` source each; `configs/held-out.yaml`
runs them):

    licenses/    Debian's /usr/share/common-licenses (GPL, Apache, MPL, CC0, …): legal text
    changelogs/  Debian's /usr/share/doc/*/changelog.Debian.gz, the newest 4 KB of each:
                 release notes, maintainer names, bug numbers
    readmes/     the long descriptions in the project venv's installed packages' METADATA
                 (Markdown and reStructuredText), at most 8 KB each: software READMEs

The builtin domains are the Python documentation, WordNet, the standard library's code,
fortunes and man pages; none of these files is among them. Files are written in sorted
order with their source's name, so the same machine gives the same folders.
"""

import argparse
import gzip
import sys
from email.parser import Parser
from pathlib import Path

LICENSES = Path("/usr/share/common-licenses")
DOCS = Path("/usr/share/doc")
CHANGELOG_BYTES = 4096
README_BYTES = 8192


def _cut(text: str, limit: int) -> str:
    """At most `limit` bytes of `text`, ending at a paragraph break where there is one."""
    data = text.encode()[:limit].decode(errors="ignore")
    end = data.rfind("\n\n")
    return data[:end] if end > limit // 4 else data


def licenses() -> dict[str, str]:
    files = {}
    for path in sorted(LICENSES.iterdir()):
        real = path.resolve()
        if real.is_file() and real.name not in files:  # GPL -> GPL-3 etc.: each text once
            files[real.name] = real.read_text(errors="replace")
    return files


def changelogs() -> dict[str, str]:
    files = {}
    for path in sorted(DOCS.glob("*/changelog.Debian.gz")):
        with gzip.open(path, "rt", errors="replace") as stream:
            files[path.parent.name] = _cut(stream.read(CHANGELOG_BYTES * 2), CHANGELOG_BYTES)
    return files


def readmes() -> dict[str, str]:
    site = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    files = {}
    for path in sorted(site.glob("*.dist-info/METADATA")):
        message = Parser().parsestr(path.read_text(errors="replace"))
        body = message.get_payload() or message.get("Description") or ""
        if len(body.strip()) > 200:
            files[message.get("Name", path.parent.name).lower()] = _cut(body, README_BYTES)
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/held-out"))
    out = parser.parse_args().out
    for name, collect in (("licenses", licenses), ("changelogs", changelogs), ("readmes", readmes)):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        texts = collect()
        for stale in folder.glob("*.txt"):
            if stale.stem not in texts:
                stale.unlink()
        for stem, text in texts.items():
            (folder / f"{stem}.txt").write_text(text)
        print(f"{name}=text:{folder}  ({len(texts)} files, {sum(len(t.encode()) for t in texts.values()):,} bytes)")


if __name__ == "__main__":
    main()
