"""Pretrained files: save/load round trips (our functions and the huggingface_hub mixin), the Hub cache offline,
strict loading with clear errors, the model card and push_to_hub, all without the network."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, RepoUrl, constants
from safetensors.torch import load_file, save_file

import nvae_hub
from nvae_hub import NVAE, NVAEConfig, load_pretrained
from nvae_hub import hub as hub_module
from nvae_hub.card import TrainingInfo, model_card
from nvae_hub.hub import push_to_hub, save_pretrained
from nvae_hub.weights import PretrainedLoadError

FILES = ["README.md", "config.json", "model.safetensors"]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TRAINING = TrainingInfo(
    command="python -m nvae_hub.train --preset mnist-small --steps 20000",
    dataset="mnist",
    steps=20000,
    wall_time_seconds=3725.0,
    hardware="2-core x86_64 CPU (no GPU)",
    metrics={"test_nll_nats": 81.2, "test_bits_per_dim": 0.149},
    metrics_note="importance-weighted, K=100, full 10k test set",
)


@pytest.fixture(scope="module")
def model() -> NVAE:
    torch.manual_seed(0)
    model = NVAE(NVAEConfig.preset("tiny"))
    with torch.no_grad():  # move the BatchNorm statistics off their defaults so that they are tested too
        model.train()
        model.sample(4, seed=1)
    return model.eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand((2, 1, 16, 16), generator=generator).bernoulli(generator=generator)


@pytest.fixture(scope="module")
def saved(model: NVAE, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_pretrained(model, tmp_path_factory.mktemp("saved") / "nvae-tiny")


def outputs(model: NVAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return model.sample(2, seed=0), model.reconstruct(x)


def assert_same_model(loaded: NVAE, model: NVAE, x: torch.Tensor) -> None:
    assert isinstance(loaded.config, NVAEConfig) and loaded.config == model.config
    assert not loaded.training and loaded.device == torch.device("cpu")
    for a, b in zip(outputs(loaded, x), outputs(model, x), strict=True):
        assert torch.equal(a, b)


def copy_of(saved: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "copy"))


# ---------------------------------------------------------------- round trips
def test_save_pretrained_then_load_pretrained_is_bit_identical(model, x, saved):
    assert sorted(os.listdir(saved)) == FILES
    assert (saved / "config.json").read_text().strip() == model.config.to_json()
    assert_same_model(load_pretrained(saved), model, x)
    assert_same_model(load_pretrained(str(saved), device="cpu"), model, x)


def test_mixin_writes_the_same_files_and_from_pretrained_round_trips(model, x, saved, tmp_path):
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == FILES
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (saved / name).read_bytes(), name
    assert_same_model(NVAE.from_pretrained(tmp_path), model, x)
    with pytest.raises(TypeError, match="strict"):  # loading is always strict
        NVAE.from_pretrained(tmp_path, strict=False)


def test_a_bundled_name_loads_its_folder(model, x, saved, monkeypatch):
    for name, folder in hub_module.BUNDLED_MODELS.items():
        assert folder.name == name and folder.parent == hub_module.BUNDLED_DIR
    monkeypatch.setitem(hub_module.BUNDLED_MODELS, "tiny-test", saved)
    assert_same_model(load_pretrained("tiny-test"), model, x)


def test_bundled_names_match_in_any_case(model, x, saved, monkeypatch):
    monkeypatch.setitem(hub_module.BUNDLED_MODELS, "tiny-test", saved)
    for name in ("TINY-TEST", "Tiny-Test"):
        assert_same_model(load_pretrained(name), model, x)
    assert hub_module.bundled_model("MNIST") == hub_module.bundled_model("mnist") == hub_module.BUNDLED_DIR / "mnist"


# ---------------------------------------------------------------- the Hub cache, offline
@pytest.fixture
def cache(saved: Path, tmp_path: Path) -> Path:
    """A Hub cache laid out by hand, as hf_hub_download leaves it, holding someuser/nvae-tiny at COMMIT."""
    repo = tmp_path / "cache" / "models--someuser--nvae-tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(saved, repo / "snapshots" / COMMIT)
    return tmp_path / "cache"


def test_load_from_the_hub_cache_with_local_files_only(model, x, cache):
    for revision in (None, "main", COMMIT):
        loaded = load_pretrained("someuser/nvae-tiny", revision=revision, cache_dir=cache, local_files_only=True)
        assert_same_model(loaded, model, x)
    with pytest.raises(PretrainedLoadError, match=r"'nobody/nothing'.*local_files_only=True.*bundled"):
        load_pretrained("nobody/nothing", cache_dir=cache, local_files_only=True)
    with pytest.raises(PretrainedLoadError, match=r"revision 'v2'"):
        load_pretrained("someuser/nvae-tiny", revision="v2", cache_dir=cache, local_files_only=True)


def test_load_from_the_hub_cache_with_hf_hub_offline(model, x, cache, tmp_path):
    script = f"""
import torch
from safetensors.torch import load_file, save_file
from nvae_hub import load_pretrained
from nvae_hub.weights import PretrainedLoadError

x = load_file({str(tmp_path / "x.st")!r})["x"]
model = load_pretrained("someuser/nvae-tiny", cache_dir={str(cache)!r})
save_file({{"sample": model.sample(2, seed=0), "recon": model.reconstruct(x)}}, {str(tmp_path / "out.st")!r})
try:
    load_pretrained("someuser/unknown", cache_dir={str(cache)!r})
except PretrainedLoadError as err:
    print(err)
"""
    save_file({"x": x}, tmp_path / "x.st")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "'someuser/unknown'" in result.stdout and "HF_HUB_OFFLINE is set" in result.stdout
    out = load_file(tmp_path / "out.st")
    sample, recon = outputs(model, x)
    assert torch.equal(out["sample"], sample) and torch.equal(out["recon"], recon)


@pytest.fixture
def unreachable_hub(monkeypatch):
    """Online mode with a Hub endpoint that refuses connections (a bound port that nobody listens on); returns the
    list of the seconds that anything slept (huggingface_hub's retries sleep), recorded instead of slept."""
    with socket.socket() as closed_port:
        closed_port.bind(("127.0.0.1", 0))
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port.getsockname()[1]}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        sleeps: list[float] = []
        monkeypatch.setattr(time, "sleep", sleeps.append)
        yield sleeps


def test_a_bare_name_that_is_not_bundled_fails_at_once_with_the_bundled_names(unreachable_hub):
    with pytest.raises(PretrainedLoadError, match=r"^'nope' is not a local folder, nor a bundled model \(bundled: "
                                                  r"fashion-mnist, mnist\), nor a Hub repo id \('user/name'\)$"):
        load_pretrained("nope")
    with pytest.raises(PretrainedLoadError, match=r"'MNSIT' is not .*; did you mean 'mnist'\?$"):
        load_pretrained("MNSIT")
    assert unreachable_hub == []


def test_an_unreachable_hub_means_the_cache_only_and_no_retries(model, x, cache, unreachable_hub):
    assert_same_model(load_pretrained("someuser/nvae-tiny", cache_dir=cache), model, x)
    message = (r"could not get config\.json of Hub repo 'someuser/unknown'; the Hub \(http://127\.0\.0\.1:\d+\) cannot "
               r"be reached \(ConnectError.*\), so only its cache was searched: not in the cache "
               r"\(.*bundled: fashion-mnist, mnist\)")
    with pytest.raises(PretrainedLoadError, match=message):
        load_pretrained("someuser/unknown", cache_dir=cache)
    assert unreachable_hub == []


# ---------------------------------------------------------------- errors
def edit_weights(folder: Path, edit) -> None:
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors")


def drop_h0(state):
    del state["h0"]


def add_extra(state):
    state["extra.weight"] = torch.zeros(3)


def reshape_h0(state):
    state["h0"] = torch.zeros(1, 2, 2)


def retype(name: str, dtype: torch.dtype):
    def edit(state):
        state[name] = state[name].to(dtype)
    return edit


def poison(name: str, value: float, dtype: torch.dtype = torch.float32):
    """Put ``value`` (NaN, inf, or a float64 too large for float32) into one element of weight ``name``."""
    def edit(state):
        state[name] = state[name].to(dtype)
        state[name].view(-1)[1] = value
    return edit


def truncate(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def garbage(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"this is not a safetensors file" * 10)


def bad_config(folder: Path) -> None:
    data = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**data, "image_size": 30}))


BROKEN = {
    "missing weight": (lambda f: edit_weights(f, drop_h0), r"model\.safetensors.*1 missing weight\(s\): h0"),
    "unexpected weight": (lambda f: edit_weights(f, add_extra), r"model\.safetensors.*unexpected.*extra\.weight"),
    "shape mismatch": (lambda f: edit_weights(f, reshape_h0), r"h0 \(expected \(32, 4, 4\), found \(1, 2, 2\)\)"),
    "truncated": (truncate, r"model\.safetensors is not a readable safetensors file"),
    "garbage": (garbage, r"model\.safetensors is not a readable safetensors file"),
    "invalid config": (bad_config, r"config\.json.*not a valid NVAE config.*image_size"),
    "int64 weight": (lambda f: edit_weights(f, retype("stem.weight", torch.int64)),
                     r"1 dtype mismatch\(es\): stem\.weight \(expected float32, found int64\)"),
    "bool weight": (lambda f: edit_weights(f, retype("h0", torch.bool)), r"h0 \(expected float32, found bool\)"),
    "float counter": (lambda f: edit_weights(f, retype("sr_steps", torch.float32)),
                      r"sr_steps \(expected int64, found float32\)"),
    "NaN weight": (lambda f: edit_weights(f, poison("stem.bias", float("nan"))),
                   r"1 weight\(s\) with NaN or infinite values: stem\.bias"),
    "inf statistic": (lambda f: edit_weights(f, poison("preprocess.0.ops.0.0.running_var", float("inf"))),
                      r"NaN or infinite values: preprocess\.0\.ops\.0\.0\.running_var"),
    "inf in float32": (lambda f: edit_weights(f, poison("h0", 1e39, torch.float64)), r"NaN or infinite values: h0"),
}


@pytest.mark.parametrize("loader", ["load_pretrained", "NVAE.from_pretrained"])
@pytest.mark.parametrize("case", BROKEN)
def test_broken_files_raise_clear_errors(saved, tmp_path, case, loader):
    folder = copy_of(saved, tmp_path)
    breaks, message = BROKEN[case]
    breaks(folder)
    load = load_pretrained if loader == "load_pretrained" else NVAE.from_pretrained
    with pytest.raises(PretrainedLoadError, match=message) as info:
        load(folder)
    if loader == "load_pretrained":  # errors name the full path of the file
        assert str(folder) in str(info.value)


def test_weights_stored_in_another_float_precision_load(model, x, saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    edit_weights(folder, lambda state: state.update({k: v.double() for k, v in state.items() if v.is_floating_point()}))
    assert_same_model(load_pretrained(folder), model, x)  # float32 -> float64 -> float32 is exact


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors"])
def test_a_folder_without_a_file_says_which_and_where(saved, tmp_path, missing):
    folder = copy_of(saved, tmp_path)
    (folder / missing).unlink()
    with pytest.raises(PretrainedLoadError, match=re.escape(f"{folder} is not a pretrained NVAE folder: {missing}")):
        load_pretrained(folder)


def test_names_that_are_nothing_raise_clear_errors(tmp_path):
    with pytest.raises(PretrainedLoadError, match="no such folder"):
        load_pretrained(tmp_path / "absent")
    with pytest.raises(PretrainedLoadError, match=r"not a local folder, nor a bundled model.*nor a valid Hub repo id"):
        load_pretrained("no/such//thing")


# ---------------------------------------------------------------- model card
def test_the_card_metadata_parses_and_holds_the_training_facts(model):
    text = model_card(model.config, TRAINING, num_parameters=87262)
    data = ModelCard(text).data
    assert data.library_name == "nvae_hub" and data.license == "apache-2.0"
    assert data.pipeline_tag == "unconditional-image-generation"
    assert {"nvae", "vae", "hierarchical-vae", "image-generation", "pytorch"} <= set(data.tags)
    assert data.datasets == ["mnist"]
    assert {r.metric_type: r.metric_value for r in data.eval_results} == TRAINING.metrics
    for fact in [f"```bash\n{TRAINING.command}\n```", "20,000", "1 h 02 min", TRAINING.hardware,
                 TRAINING.metrics_note, "https://arxiv.org/abs/2007.03898", "from nvae_hub import load_pretrained",
                 "`tiny`", "87,262"]:
        assert fact in text

    bare = ModelCard(model_card(model.config)).data
    assert bare.library_name == "nvae_hub" and bare.datasets is None and bare.eval_results is None


# ---------------------------------------------------------------- push_to_hub, without the network
@pytest.fixture
def fake_hub(monkeypatch) -> dict:
    """Replace the HfApi calls push_to_hub makes; record their arguments and the uploaded files."""
    calls: dict = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        calls["create_branch"] = (repo_id, kwargs)

    def upload_folder(self, *, folder_path, **kwargs):
        calls["upload_folder"] = kwargs
        calls["files"] = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/{COMMIT}")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_uploads_the_three_files(model, fake_hub):
    url = push_to_hub(model, "someuser/nvae-tiny", TRAINING, private=True, revision="dev", commit_message="v1")
    assert url == f"https://huggingface.co/someuser/nvae-tiny/commit/{COMMIT}"
    assert fake_hub["create_repo"] == ("someuser/nvae-tiny", {"private": True, "exist_ok": True})
    assert fake_hub["create_branch"] == ("someuser/nvae-tiny", {"branch": "dev", "exist_ok": True})
    assert fake_hub["upload_folder"] == {"repo_id": "someuser/nvae-tiny", "commit_message": "v1", "revision": "dev"}
    assert sorted(fake_hub["files"]) == FILES
    assert TRAINING.command in fake_hub["files"]["README.md"].decode()
    assert json.loads(fake_hub["files"]["config.json"]) == json.loads(model.config.to_json())


def test_the_mixin_push_to_hub_uploads_the_same_files(model, saved, fake_hub):
    model.push_to_hub("someuser/nvae-tiny")
    assert fake_hub["files"] == {name: (saved / name).read_bytes() for name in FILES}


# ---------------------------------------------------------------- no pickle
def test_the_package_never_unpickles_weights():
    for path in Path(nvae_hub.__file__).parent.glob("*.py"):
        text = path.read_text()
        assert "torch." + "load(" not in text and not re.search(r"pickle\.loads?\(", text), path
        assert "allow_pickle=True" not in text, path
        if path.name != "data.py":  # data.py's RestrictedUnpickler rebuilds numpy arrays only
            assert "import pickle" not in text, path
