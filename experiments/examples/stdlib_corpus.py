"""Export the docstrings of some of Python's standard library to a text file: a corpus for data=text that
ships with Python, so nothing is downloaded.

    python -m runner.experiments.examples.stdlib_corpus stdlib.txt

Each docstring (a module's, then its public classes', functions' and methods', in name order) is cleaned
by inspect.getdoc; its blank-line separated paragraphs become data=text's sequences. The text depends on
the Python version that exports it.
"""
import argparse
import importlib
import inspect
import sys
import warnings
from pathlib import Path
from typing import Iterator, List

# Modules of pure Python with documented APIs, on every platform.
MODULES = ("argparse", "bisect", "calendar", "collections", "contextlib", "csv", "dataclasses", "datetime",
           "difflib", "fractions", "functools", "heapq", "inspect", "json", "logging", "pathlib", "pprint",
           "queue", "random", "shutil", "statistics", "string", "tempfile", "textwrap", "threading", "typing",
           "unittest", "urllib.parse", "uuid", "zipfile")


def docstrings(module_name: str) -> Iterator[str]:
    """The module's docstring, then those of its public members defined in it (and their methods)."""
    module = importlib.import_module(module_name)
    seen = set()
    for obj in [module] + [value for name, value in sorted(vars(module).items()) if not name.startswith("_")]:
        if obj is not module and getattr(obj, "__module__", None) != module_name:
            continue  # imported from elsewhere
        members = [obj] + ([v for n, v in sorted(vars(obj).items()) if not n.startswith("_") and callable(v)]
                           if inspect.isclass(obj) else [])
        for member in members:
            doc = inspect.getdoc(member) if (inspect.ismodule(member) or inspect.isclass(member)
                                             or inspect.isroutine(member)) else None
            if doc and doc not in seen:
                seen.add(doc)
                yield doc


def corpus(modules=MODULES) -> List[str]:
    with warnings.catch_warnings():  # reading typing.io's docstring warns that typing.io is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        return [doc for name in modules for doc in docstrings(name)]


def export(path: Path) -> int:
    """Write the docstrings, separated by blank lines; return how many paragraphs the file holds."""
    text = "\n\n".join(corpus()) + "\n"
    path.write_text(text, encoding="utf-8")
    return sum(1 for p in text.split("\n\n") if p.strip())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.experiments.examples.stdlib_corpus",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, nargs="?", default=Path("stdlib.txt"))
    args = parser.parse_args(argv)
    count = export(args.out)
    print(f"wrote {args.out}: about {count} paragraphs of Python {sys.version.split()[0]}'s docstrings, "
          f"{args.out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
