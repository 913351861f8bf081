#!/usr/bin/env python3
"""Rebuilds docs/BENCHMARKS.md from the sections in docs/bench/*.md.

Each section file is written by whoever ran that benchmark (with its command);
this only puts them in order under one heading each, after the summary table.
Usage: scripts/collect-benchmarks.py   (from anywhere; rewrites the file)
"""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = ROOT / "docs" / "bench"

# (file, heading in BENCHMARKS.md, anchor, one-line headline for the table)
SECTIONS = [
    ("swarm.md", "Image distribution (issue 2)", "image-distribution-issue-2"),
    ("chunking.md", "Chunking and hashing (issue 2)", "chunking-and-hashing-issue-2"),
    ("chunk-store.md", "Chunk store (issue 2)", "chunk-store-issue-2"),
    ("overlay.md", "Overlay throughput and latency (issue 3)", "overlay-throughput-and-latency-issue-3"),
    ("overlay-core.md", "Overlay core per-frame cost (issue 3)", "overlay-core-per-frame-cost-issue-3"),
    ("vm-microvm.md", "microvm start and memory (issue 4)", "microvm-start-and-memory-issue-4"),
    ("vm-qemu.md", "Linux boot under QEMU TCG (issue 4)", "linux-boot-under-qemu-tcg-issue-4"),
    ("market.md", "Market: one run to guests answering, and replacement (issue 12)", "market-one-run-to-guests-answering-and-replacement-issue-12"),
    ("simulations.md", "Simulations (issue 17)", "simulations-issue-17"),
    ("owner.md", "The owner's machine beside a guest (issue 13)", "the-owners-machine-beside-a-guest-issue-13"),
    ("distcc.md", "distcc build farm on rented sellers (issue 18)", "distcc-build-farm-on-rented-sellers-issue-18"),
    ("owner-link.md", "The owner's traffic beside the swarm's uploads (issue 16)", "the-owners-traffic-beside-the-swarms-uploads-issue-16"),
]

# Rows of the summary table that point into a section rather than heading one:
# (key in headlines.md, title, link)
EXTRA_ROWS = [
    ("swarm-matrix", "Home-links matrix (issue 16)", "bench/swarm.md#home-links-matrix-2026-12-08"),
]

HEADLINES = (BENCH / "headlines.md").read_text().strip().splitlines()

INTRO = """# Benchmarks

Every figure below was measured on a 2-core development machine of this project
(shared and noisy), with the exact command that produced it. Where a figure is
compared with a reference, both were measured side by side in the same run and the
ratio is what counts; bare times move by 20-30 % between runs on these machines.
Each section is kept in `docs/bench/` beside the raw data; this file collects them
(`scripts/collect-benchmarks.py` rebuilds it).
"""


def body(text: str) -> str:
    # drop the section file's own title line (the collected file gives its own)
    # and keep its subsections below the "##" of the section
    lines = text.strip().splitlines()
    demote = bool(lines) and lines[0].startswith("# ")
    if lines and re.match(r"^#{1,2} ", lines[0]):
        lines = lines[1:]
    if demote:
        fence = False
        out = []
        for line in lines:
            if line.startswith("```"):
                fence = not fence
            out.append("#" + line if not fence and re.match(r"^#+ ", line) else line)
        lines = out
    return "\n".join(lines).strip()


def main() -> None:
    out = [INTRO, "| section | headline |", "|---|---|"]
    heads = dict(h.split(": ", 1) for h in HEADLINES if ": " in h)
    for f, title, anchor in SECTIONS:
        out.append(f"| [{title.split(' (')[0]}](#{anchor}) | {heads.get(f, '')} |")
    for key, title, link in EXTRA_ROWS:
        out.append(f"| [{title}]({link}) | {heads.get(key, '')} |")
    out.append("")
    for f, title, _ in SECTIONS:
        out.append(f"## {title}\n")
        out.append(body((BENCH / f).read_text()))
        out.append("")
    (ROOT / "docs" / "BENCHMARKS.md").write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
