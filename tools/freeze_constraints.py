"""Print the exact versions (`name==version`) of every installed package that `pip install -e ".[dev]"` pulls in.

Run it with the interpreter of the environment to freeze: `python tools/freeze_constraints.py > constraints.txt`.
It is `pip freeze --exclude-editable` restricted to the dependency closure of framepack-engine[dev] (markers
evaluated for this interpreter), without pip/setuptools/wheel (as pip freeze leaves them out) and with local
version labels dropped (`torch==2.13.0`, not `2.13.0+cpu`, so a CUDA build of the same release satisfies it).
"""

import re
import sys
from importlib import metadata

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
except ImportError:  # pip vendors packaging
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement

ROOT = "framepack-engine"
ROOT_EXTRAS = ("dev",)
LEFT_OUT = {"pip", "setuptools", "wheel", "distribute"}
# Test oracles installed with --no-deps (pyproject.toml says why): pinned, their own requirements not followed.
NO_DEPS = ("ccvfi", "spandrel")

HEADER = """\
# The exact versions CI passes with: every package that `pip install -e ".[dev]"` installs, pinned.
# Install with them: pip install torch==2.13.0 && pip install -c constraints.txt -e ".[dev]"
# pyproject.toml keeps the open ranges; this file is what the tests last passed with.
# To move it forward (newest allowed versions, the README test command, then this file rewritten if it passes):
#     bash tools/update_constraints.sh
# Written by tools/freeze_constraints.py: do not edit by hand.
"""


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def installed():
    dists = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            dists.setdefault(canonical(name), dist)
    return dists


def closure(dists):
    environment = default_environment()
    seen = {}   # canonical name -> the extras already followed
    todo = [(canonical(ROOT), set(ROOT_EXTRAS))]
    while todo:
        name, extras = todo.pop()
        if name not in dists:
            raise SystemExit(f"{name} is required but not installed: install the project first (pip install -e \".[dev]\")")
        new_extras = extras - seen.get(name, set())
        if name in seen and not new_extras:
            continue
        seen.setdefault(name, set()).update(extras)
        for line in dists[name].requires or []:
            requirement = Requirement(line)
            wanted = requirement.marker is None or any(
                requirement.marker.evaluate({**environment, "extra": extra}) for extra in ({""} | seen[name]))
            if wanted:
                todo.append((canonical(requirement.name), set(requirement.extras)))
    return seen


def main():
    dists = installed()
    wanted = set(closure(dists)) | {canonical(name) for name in NO_DEPS if canonical(name) in dists}
    names = sorted(n for n in wanted if n != canonical(ROOT) and n not in LEFT_OUT)
    lines = []
    for name in names:
        dist = dists[name]
        version = dist.version.split("+", 1)[0]
        lines.append(f"{dist.metadata['Name']}=={version}")
    sys.stdout.write(HEADER + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
