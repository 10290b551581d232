"""Print `name==version` for every package kleinserve needs at run time except torch and what torch
itself requires, with the versions installed here (`make setup`: constraints.txt): the list `make gpu-wheels`
downloads for a GPU machine that has a CUDA torch but no network.

    python bench/gpu_requirements.py [--extra NAME ...] [--present NAME ...] > requirements.txt

torch's own requirements (filelock, fsspec, jinja2, networkx, sympy, typing-extensions, triton, nvidia-*) come
with any installed torch, so they are left out (sympy alone is 6 MB of the transfer); a package both torch
and kleinserve's libraries need is then torch's version there, which pip accepts as long as it satisfies the
libraries' ranges.
"""

from __future__ import annotations

import argparse
import re
from importlib.metadata import PackageNotFoundError, distribution

from packaging.requirements import Requirement

ROOT = "kleinserve"
SKIPPED = "torch"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(name: str, extras: set[str]) -> list[Requirement]:
    """`name`'s requirements that apply on this Python with `extras`."""
    found = []
    for text in distribution(name).requires or []:
        requirement = Requirement(text)
        marker = requirement.marker
        if marker is None or any(marker.evaluate({"extra": extra}) for extra in extras | {""}):
            found.append(requirement)
    return found


def closure(root: str, extras: set[str]) -> dict[str, str]:
    """canonical name -> installed version of everything `root` (with `extras`) needs, torch's tree apart."""
    torch_tree = {canonical(r.name) for r in requirements(SKIPPED, set())} | {SKIPPED}
    seen: dict[str, str] = {}
    pending = [(root, extras)]
    while pending:
        name, wanted = pending.pop()
        for requirement in requirements(name, wanted):
            key = canonical(requirement.name)
            if key in seen or key in torch_tree or key == ROOT:
                continue
            try:
                seen[key] = distribution(requirement.name).version
            except PackageNotFoundError:
                raise SystemExit(
                    f"{requirement.name} (needed by {name}) is not installed here: run make setup"
                ) from None
            pending.append((requirement.name, set(requirement.extras)))
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--extra", action="append", default=[], help="kleinserve extras to include too")
    parser.add_argument(
        "--present", action="append", default=[], help="a package the GPU machine is known to have (left out)"
    )
    args = parser.parse_args()
    present = {canonical(name) for name in args.present}
    for name, version in sorted(closure(ROOT, set(args.extra)).items()):
        if name not in present:
            print(f"{name}=={version}")


if __name__ == "__main__":
    main()
