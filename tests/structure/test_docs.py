"""The documentation: README.md and docs/**/*.md link only to files (and headings) that exist; the
README's first code block holds the two commands CI runs; docs/workflows.md describes every shipped
workflow; docs/cli.md names every command and option; the README and docs/dev/architecture.md name
every node."""

import argparse
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").rglob("*.md"))

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~)")


def prose(text: str) -> str:
    """The text with fenced code blocks and inline code removed (links there are not links)."""
    lines, inside = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            inside = not inside
            continue
        if not inside:
            lines.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(lines)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    text = re.sub(r"[`*]", "", text)
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for line in prose(path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            result.add(base if n == 0 else f"{base}-{n}")
    return result


def relative_links(path: Path) -> list[str]:
    links = LINK.findall(prose(path.read_text(encoding="utf-8")))
    return [link for link in links if not re.match(r"^[a-z][a-z0-9+.-]*:", link, re.I)]


def test_slug_is_githubs():
    assert slug("VRAM: what to pick, by GPU memory") == "vram-what-to-pick-by-gpu-memory"
    assert slug("On a lent GPU (prepared, not yet run on a GPU)") == "on-a-lent-gpu-prepared-not-yet-run-on-a-gpu"
    assert slug("Several processes: `--parallel`") == "several-processes---parallel"


def test_relative_links_resolve():
    broken = []
    checked = 0
    for page in [README, *DOCS]:
        for link in relative_links(page):
            target, _, anchor = link.partition("#")
            file = (page.parent / target).resolve() if target else page
            checked += 1
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {link} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.relative_to(ROOT)}: {link} (no heading with that anchor)")
    assert checked > 20
    assert not broken, "\n".join(broken)


def test_readme_links_every_doc():
    linked = {(ROOT / link.partition("#")[0]).resolve() for link in relative_links(README)}
    assert DOCS
    assert [page.name for page in DOCS if page.resolve() not in linked] == []


def first_block(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if FENCE.match(line.strip()))
    end = next(i for i in range(start + 1, len(lines)) if FENCE.match(lines[i].strip()))
    return lines[start + 1 : end]


def test_readme_first_block_is_the_two_commands_ci_runs():
    commands = [line for line in first_block(README.read_text(encoding="utf-8")) if line.strip()]
    assert len(commands) == 2, commands
    assert commands[1] in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()


def test_every_workflow_is_described_and_pictured():
    workflows = sorted(p.name for p in (ROOT / "workflows").glob("*.json"))
    page = (ROOT / "docs" / "workflows.md").read_text(encoding="utf-8")
    readme = README.read_text(encoding="utf-8")
    assert workflows
    assert [w for w in workflows if f"**`{w}`**" not in page] == []
    assert [w for w in workflows if f"(workflows/{w})" not in readme] == []
    pictures = {link for link in relative_links(ROOT / "docs" / "workflows.md") if link.endswith(".png")}
    assert [w for w in workflows if f"workflows/{w[:-5]}.png" not in pictures] == []


def test_cli_page_names_every_command_and_option():
    from consisid_core.cli import _parser

    page = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    synopsis = "\n".join(first_block(page))
    readme = README.read_text(encoding="utf-8")
    (commands,) = [a for a in _parser()._actions if a.choices and a.dest == "command"]
    missing = []
    for name, parser in commands.choices.items():
        if f"python -m consisid_core {name}" not in synopsis or f"`{name}`" not in readme:
            missing.append(name)
        for action in parser._actions:
            if action.help == argparse.SUPPRESS:  # an old spelling of a renamed option
                continue
            long = [o for o in action.option_strings if o.startswith("--") and o != "--help"]
            missing += [f"{name} {o}" for o in long if not re.search(re.escape(o) + r"\b", synopsis)]
    assert missing == []


def test_readme_and_architecture_name_every_node():
    from workflow_tools import import_pack

    import_pack()
    from consisid_pack.nodes import NODE_DISPLAY_NAME_MAPPINGS

    readme = " ".join(README.read_text(encoding="utf-8").split())
    architecture = " ".join((ROOT / "docs" / "dev" / "architecture.md").read_text(encoding="utf-8").split())
    names = sorted(NODE_DISPLAY_NAME_MAPPINGS.values())
    assert len(names) > 20
    assert [n for n in names if n not in readme] == []
    assert [n for n in names if n not in architecture] == []


def test_architecture_states_the_layer_contract():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 and later
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    (layers,) = [c["layers"] for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "layers"]
    chain = " → ".join(f"`{layer}`" for layer in layers)
    text = " ".join((ROOT / "docs" / "dev" / "architecture.md").read_text(encoding="utf-8").split())
    assert chain in text
