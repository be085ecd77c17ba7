"""Unit tests for hdpo_ray.config: overrides, validation errors (one line naming the key), job files."""

from __future__ import annotations

from pathlib import Path

import pytest

from hdpo_ray.config import EMBEDDED_EVAL, Config, ConfigError, LoggingConfig, load_config, parse_overrides

REPO = Path(__file__).resolve().parents[2]
JOBS = REPO / "jobs"

MUST_EXIST = [
    "output_dir",
    "model.name_or_path",
    "model.ref_name_or_path",
    "data.train_files",
    "data.eval_files",
    "data.on_invalid",
    "data.max_length",
    "data.max_prompt_length",
    "loss.alpha",
    "loss.beta",
    "train.num_workers",
    "train.max_steps",
    "train.epochs",
    "train.lr",
    "train.zero_stage",
    "train.seed",
]


def _lookup(config: Config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


# ---- parse_overrides --------------------------------------------------------------------------


def test_parse_overrides_yaml_values():
    tree = parse_overrides(
        [
            "loss.alpha=0.9",
            "data.eval_files=[a.parquet]",
            "train.zero_stage=3",
            "output_dir=out/x",
            "model.ref_name_or_path=",
        ]
    )
    assert tree == {
        "loss": {"alpha": 0.9},
        "data": {"eval_files": ["a.parquet"]},
        "train": {"zero_stage": 3},
        "output_dir": "out/x",
        "model": {"ref_name_or_path": None},
    }
    assert isinstance(tree["loss"]["alpha"], float)
    assert isinstance(tree["data"]["eval_files"], list)
    assert isinstance(tree["train"]["zero_stage"], int)


def test_parse_overrides_value_with_equals_sign():
    assert parse_overrides(["output_dir=a=b"]) == {"output_dir": "a=b"}


def test_overrides_reach_the_config():
    config = load_config(
        overrides=[
            "loss.alpha=0.9",
            "data.eval_files=[embedded:ultrafeedback/test_prefs-100.parquet]",
            "train.zero_stage=3",
        ]
    )
    assert config.loss.alpha == 0.9 and isinstance(config.loss.alpha, float)
    assert config.data.eval_files == ["embedded:ultrafeedback/test_prefs-100.parquet"]
    assert config.train.zero_stage == 3


def test_later_override_wins():
    assert load_config(overrides=["loss.beta=0.2", "loss.beta=0.3"]).loss.beta == 0.3


def test_override_beats_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  alpha: 0.5\n  beta: 0.2\n")
    config = load_config(str(path), ["loss.alpha=0.7"])
    assert config.loss.alpha == 0.7
    assert config.loss.beta == 0.2  # from the file, untouched by the override


# ---- keys -------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", MUST_EXIST)
def test_must_exist_keys(key):
    config = load_config()
    _lookup(config, key)  # AttributeError if missing
    assert key in config.to_dict() if "." not in key else key.split(".")[1] in config.to_dict()[key.split(".")[0]]


def test_defaults():
    config = load_config()
    assert config.loss.alpha == 1.0  # DPO unless asked otherwise
    assert config.loss.beta > 0
    assert config.data.max_prompt_length < config.data.max_length
    assert config.data.on_invalid in ("error", "skip")


def test_reference_falls_back_to_policy():
    config = load_config(overrides=["model.name_or_path=some/model"])
    assert config.model.ref_name_or_path is None
    assert config.model.reference == "some/model"
    config = load_config(overrides=["model.name_or_path=some/model", "model.ref_name_or_path=other/ref"])
    assert config.model.reference == "other/ref"


# ---- errors -----------------------------------------------------------------------------------


def _error(overrides=None, path=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert message and "\n" not in message, f"not one line: {message!r}"
    return message


@pytest.mark.parametrize(
    "override, key",
    [
        ("loss.alpha=0", "loss.alpha"),
        ("loss.alpha=-1", "loss.alpha"),
        ("loss.beta=0", "loss.beta"),
        ("train.nope=1", "train.nope"),
        ("nope=1", "nope"),
        ("data.on_invalid=maybe", "data.on_invalid"),
        ("data.train_files=[/nonexistent/x.jsonl]", "data.train_files"),
        ("data.max_prompt_length=512", "data.max_prompt_length"),
        ("data.max_prompt_length=600", "data.max_prompt_length"),
        ("train.zero_stage=4", "train.zero_stage"),
        ("loss.alpha", "loss.alpha"),
        ("eval.temperatures=[1e-6]", "eval.temperatures"),  # greedy on vLLM, sampled on hf: refused
        ("eval.temperatures=[-1]", "eval.temperatures"),
    ],
)
def test_errors_are_one_line_naming_the_key(override, key):
    message = _error([override])
    assert key in message


def test_unknown_key_says_unknown():
    assert "unknown" in _error(["train.nope=1"]).lower()
    assert "unknown" in _error(["nope=1"]).lower()


def test_missing_train_file_names_the_file():
    assert "/nonexistent/x.jsonl" in _error(["data.train_files=[/nonexistent/x.jsonl]"])


def test_missing_config_file():
    message = _error(path="/nonexistent/config.yaml")
    assert "/nonexistent/config.yaml" in message


def test_malformed_override_raises_from_parse():
    with pytest.raises(ConfigError) as info:
        parse_overrides(["loss.alpha"])
    assert "loss.alpha" in str(info.value) and "\n" not in str(info.value)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_invalid_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("loss: [unclosed\n  alpha: 1\n")
    assert str(path) in _error(path=str(path))


def test_yaml_file_with_unknown_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  alpah: 0.9\n")
    assert "loss.alpah" in _error(path=str(path))


def test_a_bare_value_for_a_list_key_is_a_one_element_list():
    config = load_config(
        overrides=[
            "data.train_files=embedded:ultrafeedback/test_prefs-100.parquet",
            "eval.temperatures=0.5",
            "sweep.alphas=0.9",
            "model.lora.target_modules=q_proj",
        ]
    )
    assert config.data.train_files == ["embedded:ultrafeedback/test_prefs-100.parquet"]
    assert (
        config.eval.temperatures == [0.5]
        and config.sweep.alphas == [0.9]
        and config.model.lora.target_modules == ["q_proj"]
    )
    assert load_config(overrides=["model.lora.target_modules=all-linear"]).model.lora.target_modules == "all-linear"


def test_unknown_keys_get_a_suggestion_and_the_yaml_file_is_named(tmp_path):
    assert "did you mean 'loss.alpha'" in _error(["loss.alhpa=0.9"])
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr_sheduler: linear\n")
    message = _error(path=str(path))
    assert f"in {path}" in message and "did you mean 'train.lr_scheduler'" in message
    path.write_text("data:\n  max_length: 64\n")  # a value the overrides fix is no error of the file
    assert load_config(str(path), ["data.max_prompt_length=32"]).data.max_length == 64


def test_a_section_given_a_value_says_so_without_internal_names():
    message = _error(["model=foo"])
    assert "model is a section" in message and "Config" not in message


def test_a_missing_local_gguf_model_is_refused_before_ray_starts(tmp_path):
    assert (
        _error([f"model.ref_name_or_path={tmp_path}/ref.gguf"])
        == f"model.ref_name_or_path: GGUF file {tmp_path}/ref.gguf does not exist"
    )


def test_hub_id_train_file_is_allowed():
    config = load_config(overrides=["data.train_files=[HuggingFaceH4/ultrafeedback_binarized:train_prefs]"])
    assert config.data.train_files == ["HuggingFaceH4/ultrafeedback_binarized:train_prefs"]


# ---- job files --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny.yaml", "zephyr-7b-hdpo.yaml", "smollm2-135m.yaml"])
def test_job_files_load(name):
    path = JOBS / name
    if not path.exists():
        pytest.skip(f"{path} not written yet")
    config = load_config(str(path))
    assert isinstance(config, Config)


@pytest.mark.parametrize("name", ["tiny.yaml", "zephyr-7b-hdpo.yaml", "smollm2-135m.yaml"])
def test_job_files_first_line_is_the_command(name):
    path = JOBS / name
    if not path.exists():
        pytest.skip(f"{path} not written yet")
    first = path.read_text().splitlines()[0]
    assert first.startswith("# hdpo-ray"), f"{name}: first line should start with '# hdpo-ray', got {first!r}"
    assert f"--config jobs/{name}" in first


def test_tiny_job_file_writes_out_the_built_in_defaults():
    # `hdpo-ray train` and `hdpo-ray train --config jobs/tiny.yaml` run the same config: one set of defaults
    assert load_config(str(JOBS / "tiny.yaml")).to_dict() == load_config().to_dict()
    config = load_config()
    assert config.model.name_or_path == config.model.reference == "hdpo-ray/tiny-llama-sft"
    assert config.sweep.alphas == [0.8, 1.0, 1.2]


def test_user_data_gets_error_and_no_eval_split_the_shipped_sample_skip_and_its_eval_split(tmp_path):
    mine = tmp_path / "mine.jsonl"
    mine.write_text("")
    demo = load_config().data
    assert demo.on_invalid == "skip" and demo.eval_files == [EMBEDDED_EVAL]  # the sample has 6 unusable pairs
    own = load_config(overrides=[f"data.train_files=[{mine}]"]).data
    assert own.on_invalid == "error" and own.eval_files == []  # not the demo's held-out pairs
    assert load_config(overrides=[f"data.eval_files={mine}"]).data.on_invalid == "error"  # any user file
    assert load_config(overrides=[f"data.train_files=[{mine}]", "data.on_invalid=skip"]).data.on_invalid == "skip"
    assert load_config(overrides=["data.on_invalid=error"]).data.on_invalid == "error"
    path = tmp_path / "job.yaml"
    path.write_text(f"data:\n  train_files: [{mine}]\n")
    assert load_config(str(path)).data.on_invalid == "error"


def test_reference_and_eval_actors_follow_training_onto_gpus():
    cpu = load_config()
    assert cpu.reference.num_gpus_per_actor == cpu.eval.num_gpus_per_actor == 0
    gpu = load_config(overrides=["train.use_gpu=true"])
    assert gpu.reference.num_gpus_per_actor == gpu.eval.num_gpus_per_actor == 1
    mixed = load_config(
        overrides=["train.use_gpu=true", "reference.num_gpus_per_actor=0", "eval.num_gpus_per_actor=0.5"]
    )
    assert (mixed.reference.num_gpus_per_actor, mixed.eval.num_gpus_per_actor) == (0, 0.5)
    saved = load_config(overrides=["train.use_gpu=true"]).to_dict()  # config.json holds the resolved values
    assert saved["reference"]["num_gpus_per_actor"] == saved["eval"]["num_gpus_per_actor"] == 1.0


def test_local_mlflow_stores_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = {
        "mlruns": f"file://{tmp_path}/mlruns",
        "file:mlruns": f"file://{tmp_path}/mlruns",
        "file:///srv/mlruns": "file:///srv/mlruns",
        "sqlite:///mlflow.db": f"sqlite:///{tmp_path}/mlflow.db",  # sqlite://// + absolute path
        "sqlite:////srv/mlflow.db": "sqlite:////srv/mlflow.db",
        "http://mlflow:5000": "http://mlflow:5000",
        "databricks": "databricks",
    }
    for given, expected in cases.items():
        uri = LoggingConfig(mlflow_uri=given).mlflow_uri
        # and stays so when validated again
        assert uri == expected and LoggingConfig(mlflow_uri=uri).mlflow_uri == uri, given


def test_pass_at_k_defaults_to_powers_of_two_up_to_the_samples():
    assert load_config().eval.k == [1, 2, 4]
    assert load_config(overrides=["eval.num_samples=1"]).eval.k == [1]  # num_samples alone stays valid
    assert load_config(overrides=["eval.num_samples=10"]).eval.k == [1, 2, 4, 8]
    assert load_config(overrides=["eval.num_samples=10", "eval.k=[1,10]"]).eval.k == [1, 10]
