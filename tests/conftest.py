"""Shared fixtures: the offline SmolLM2 tokenizer/model (converted once per machine), small temp run dirs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("LONGALIGN_HOME", str(ROOT / ".longalign_home"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

SAMPLE = ROOT / "data" / "sample_longalign.jsonl"

from tests.llm_server import llm_server  # noqa: E402,F401  (real HTTP chat server fixture)


@pytest.fixture(scope="session")
def smol_tokenizer():
    from longalign_lib.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smol_model_and_tokenizer():
    from longalign_lib.models import load_model_and_tokenizer

    return load_model_and_tokenizer("smollm2-135m-instruct", dtype="fp32", device="cpu")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _single_thread():
    """One torch thread: on a 2-core machine shared with other processes, two OpenMP threads waiting on each other
    ran model code several times slower than one (measured). Restores the setting afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


one_torch_thread = pytest.fixture(_single_thread, name="one_torch_thread")
one_torch_thread_module = pytest.fixture(_single_thread, scope="module", name="one_torch_thread_module")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer random model folder with SmolLM2's tokenizer (toy_data.tiny_model_dir), one per test module."""
    from longalign_lib import toy_data

    return toy_data.tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def rows(smol_tokenizer):
    """Six verse-lookup records (half long) as tokenized rows: input_ids, labels, length, n_target."""
    from longalign_lib import toy_data
    from longalign_lib.formatting import format_records

    recs = toy_data.verse_lookup_records(6, min_tokens=60, max_tokens=300, long_fraction=0.5, seed=3)
    exs, _ = format_records(recs, smol_tokenizer, max_length=4096)
    return [e.row() for e in exs]
