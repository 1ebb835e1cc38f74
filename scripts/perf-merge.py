#!/usr/bin/env python3
"""Merge a freshly generated docs/PERFORMANCE.md with the previous one.

    scripts/perf-merge.py OLD NEW > MERGED

`make bench` regenerates the whole document, but some sections come from
runs it does not repeat by default (BENCH_ONLY=spark, recipients, parquet,
hand-measured analyses of one issue). Dropping them silently would lose
measured numbers, so every level-2 section of OLD whose heading NEW does not
have is appended after NEW's sections, under a note saying it was kept from
an earlier run (its own text carries its date and command).
"""
import re
import sys


KEPT = " (kept from an earlier run)"


def sections(text):
    """Split at '## ' headings: (preamble, [(heading, body), ...])."""
    parts = re.split(r"(?m)^(## .*)$", text)
    pre, rest = parts[0], parts[1:]
    return pre, [(rest[i].strip(), rest[i + 1]) for i in range(0, len(rest), 2)]


def main():
    old_path, new_path = sys.argv[1], sys.argv[2]
    try:
        old = open(old_path, encoding="utf-8").read()
    except FileNotFoundError:
        old = ""
    new = open(new_path, encoding="utf-8").read()
    _, new_secs = sections(new)
    have = {h for h, _ in new_secs}
    _, old_secs = sections(old)
    out = new.rstrip("\n") + "\n"
    for h, b in old_secs:
        base = h.removesuffix(KEPT)
        if base in have:
            continue
        out += "\n" + base + KEPT + "\n\n" + b.strip("\n") + "\n"
    sys.stdout.write(out)


if __name__ == "__main__":
    main()
