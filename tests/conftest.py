import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the tests' prepared-data cache (distributed.data_cache: auto), apart from the user's; subprocesses inherit it
os.environ.setdefault("ORTHO_LORA_DATA_CACHE", tempfile.mkdtemp(prefix="ortho-lora-test-data-"))
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    from tests.models import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory):
    from tests.models import save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Tiny BERT + Llama (real word tokenizers) and two small tasks, for end-to-end application tests."""
    from tests.models import save_app_models, write_app_tasks

    root = tmp_path_factory.mktemp("app")
    return {"models": save_app_models(root / "models"), "data": write_app_tasks(root / "data"), "root": root}
