"""The one thing pyproject.toml cannot say: ship the repository's ``specs/`` and ``quickstart/`` inside the
wheel without a copy of them in git. They are mapped to ``utune/_data/specs`` and ``utune/_data/quickstart``
at build time (``utune.spec.catalog.roots`` reads them there; in a checkout it reads the folders
themselves); every folder below them is a data package holding all of its files. Everything else
(metadata, extras, the entry point) is in pyproject.toml."""

from pathlib import Path

from setuptools import find_packages, setup

DATA = {"utune._data.specs": "specs", "utune._data.quickstart": "quickstart"}


def data_packages() -> dict[str, list[str]]:
    """Each folder under specs/ and quickstart/ as a package (name -> its files' patterns)."""
    found = {}
    for name, root in DATA.items():
        for folder in [Path(root), *sorted(p for p in Path(root).rglob("*") if p.is_dir())]:
            if "__pycache__" not in folder.parts:
                found[".".join([name, *folder.relative_to(root).parts])] = ["*"]
    return found


PACKAGE_DATA = data_packages()

setup(
    packages=[*find_packages(include=["utune", "utune.*"]), *PACKAGE_DATA],
    package_dir=DATA,
    package_data={"utune": ["_specs_index.json", "py.typed"], **PACKAGE_DATA},
    exclude_package_data={name: ["*.pyc"] for name in PACKAGE_DATA},
)
