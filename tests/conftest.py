import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return tiny.make_tokenizer()


@pytest.fixture(scope="session", params=tiny.FAMILIES)
def tiny_family(request):
    return request.param


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """family -> folder with a saved tiny model and tokenizer."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {fam: tiny.save_tiny(root / fam, fam) for fam in tiny.FAMILIES}


@pytest.fixture(scope="module")
def lm(tiny_model_dirs):
    """The tiny Llama in float32 on the CPU, loaded once per test module (a module may define its own lm)."""
    from saeforge.models import load_model

    return load_model(str(tiny_model_dirs["llama"]), dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory):
    """A folder of real text nobody here wrote: a few standard-library modules' source, ~20 documents."""
    import argparse  # noqa: E401
    import collections
    import inspect
    import textwrap
    import typing

    root = tmp_path_factory.mktemp("corpus")
    for mod in (argparse, collections, inspect, textwrap, typing):
        (root / f"{mod.__name__}.txt").write_text(inspect.getsource(mod))
    return root
