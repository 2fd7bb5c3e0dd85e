"""Checks the library's `rust-version` against what it depends on.

Only one toolchain can be installed on CI, so the MSRV is checked in two halves:
clippy's `incompatible_msrv` lint (on in `.ci/run`) rejects std APIs newer than
`rust-version` in our own code, and this script rejects any normal (non-dev)
dependency, with every feature on, that declares a newer `rust-version` than ours.
"""

import json
import subprocess
import sys


def version(text):
    parts = [int(part) for part in text.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def main():
    meta = json.loads(
        subprocess.check_output(
            ["cargo", "metadata", "--format-version", "1", "--all-features", "--locked"]
        )
    )
    packages = {p["id"]: p for p in meta["packages"]}
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    root = meta["resolve"]["root"]
    ours = version(packages[root]["rust_version"])

    seen, stack, bad = set(), [root], []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for dep in nodes[node]["deps"]:
            if any(kind["kind"] is None for kind in dep["dep_kinds"]):
                stack.append(dep["pkg"])
    for node in sorted(seen - {root}):
        pkg = packages[node]
        theirs = pkg.get("rust_version")
        if theirs and version(theirs) > ours:
            bad.append(f"{pkg['name']} {pkg['version']} needs Rust {theirs}")

    print(f"msrv: rust-version {packages[root]['rust_version']}, {len(seen) - 1} library dependencies")
    if bad:
        print("msrv: dependencies newer than rust-version:\n  " + "\n  ".join(bad))
        sys.exit(1)


if __name__ == "__main__":
    main()
