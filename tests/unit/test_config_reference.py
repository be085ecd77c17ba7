"""Unit tests for hdpo_ray.config_reference: the --help-config text and docs/configuration.md."""

from __future__ import annotations

from typing import Literal

from hdpo_ray.config import LAYERING, load_config
from hdpo_ray.config_reference import help_text, keys, markdown, type_text, yaml_value
from tests.helpers import REPO


def test_types_read_as_a_user_writes_them():
    assert type_text(float | None) == "float | null"
    assert type_text(Literal["error", "skip"] | None) == "error | skip | null"
    assert type_text(list[str] | Literal["all-linear"]) == "list of str | all-linear"
    assert type_text(tuple[float, float]) == "[float, float]"
    assert type_text(dict[str, float]) == "map of str to float"
    assert yaml_value((0.9, 0.999)) == "[0.9, 0.999]" and yaml_value(None) == "null" and yaml_value(True) == "true"


def test_every_key_is_listed_once_with_its_bounds_and_its_default_is_what_runs():
    listed = {key.name: key for key in keys()}
    assert len(listed) == len(keys())
    assert listed["loss.alpha"].type == "float, > 0" and listed["model.lora.dropout"].type == "float, >= 0, < 1"
    assert listed["train.zero_stage"].type == "0 | 1 | 2 | 3"
    defaults = load_config().to_dict()
    for name in ("train.lr", "data.max_length", "model.name_or_path", "sweep.alphas", "eval.temperatures"):
        section, leaf = name.split(".")
        assert listed[name].default == yaml_value(defaults[section][leaf]), name
    assert all(key.meaning for key in keys()), [key.name for key in keys() if not key.meaning]


def test_help_text_states_the_layering_and_one_entry_per_key():
    text = help_text()
    assert text.startswith(LAYERING)
    assert "loss.alpha = 1.0    # float, > 0\n    H-DPO entropy coefficient" in text
    assert text.count("\n    ") == len(keys())


def test_docs_configuration_page_is_current():
    page = REPO / "docs" / "configuration.md"
    assert page.read_text() == markdown(), (
        "docs/configuration.md is stale: python -m hdpo_ray.config_reference > docs/configuration.md"
    )
