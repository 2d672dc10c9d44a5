#!/usr/bin/env python3
"""Checks that `cargo build -p <bin>` resolves the same dependency features as `cargo build --workspace`.

Cargo turns on a dependency's features from the packages selected for a build. When they differ, `cargo build -p
mesh-control` makes a second mesh-control, and each build throws away the other's cache. For each binary package
below, every crate in its dependency graph must have the features the workspace build gives it; a crate that does
not is named with the features it lacks, to be added to workspace-hack/Cargo.toml.
"""
import subprocess
import sys

BINARIES = ["mesh-control", "meshctl"]


def features(selection):
    """crate -> set of features, as `cargo build <selection>` resolves them (normal and build edges, host target)."""
    out = subprocess.run(
        ["cargo", "tree", *selection, "--edges", "normal,build", "--format", "{p}|{f}", "--prefix", "none", "--quiet"],
        check=True, capture_output=True, text=True,
    ).stdout
    resolved = {}
    for line in out.splitlines():
        name, _, feats = line.removesuffix(" (*)").partition("|")
        resolved[name] = set(filter(None, feats.split(",")))
    return resolved


def main():
    workspace = features(["--workspace"])
    bad = False
    for binary in BINARIES:
        for crate, feats in sorted(features(["-p", binary]).items()):
            missing = workspace.get(crate, set()) - feats
            if missing:
                bad = True
                print(f"`cargo build -p {binary}` builds {crate} without {', '.join(sorted(missing))}", file=sys.stderr)
    if bad:
        print("add them to workspace-hack/Cargo.toml, so every build of these binaries shares one cache", file=sys.stderr)
        return 1
    print(f"features agree: {', '.join(BINARIES)} build every dependency as the workspace build does")
    return 0


if __name__ == "__main__":
    sys.exit(main())
