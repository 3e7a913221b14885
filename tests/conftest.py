import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The modules as `pip install -e .` makes them importable, for the tests and for the scripts they
# start (python index/main.py, ...); convert/'s scripts import their sibling weights.py as a script does.
sys.path.insert(0, str(ROOT / "convert"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest  # noqa: E402

from fixtures import make_dataset, save_tiny_checkpoint  # noqa: E402


@pytest.fixture(autouse=True)
def isolated_state():
    """Every test starts from the same global state, whatever ran before it (the suite runs in a
    shuffled order): seeds, torch's thread count and default dtype, and the loaders' caches."""
    import torch

    import data
    import prompt
    from utils import set_seed

    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    data._load_files.cache_clear()
    data._load_user_file.cache_clear()
    prompt.load_prompt_set.cache_clear()
    set_seed(0)
    yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)


@pytest.fixture
def tiny_data(tmp_path):
    """(data_path, dataset name) of a small synthetic dataset in the SPEC formats."""
    return make_dataset(tmp_path / "data"), "Tiny"


@pytest.fixture(scope="session")
def tiny_base_model(tmp_path_factory):
    """Folder of a tiny random LlamaForCausalLM with a tokenizer trained on the fly."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_base"))
