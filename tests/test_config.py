"""Configuration: strict merging, clear errors, presets, and the info CLI."""

from __future__ import annotations

import glob
import json
import os

import pytest

from nbp_mega.config import dump_config, load_config
from nbp_mega.config_fields import ConfigError, parse_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.stepz=3"])
    msg = str(e.value)
    assert "train.stepz" in msg and "steps" in msg and "global_batch" in msg


def test_bad_values_name_key_and_range():
    cases = {"train.steps=0": ">= 1", "parallel.zero_stage=4": "one of 0, 1, 2, 3",
             "model.dropout=1.5": "<= 1.0", "train.steps=abc": "expected int",
             "model.family=bert": "'gpt'", "model.block_shape=[1,0,16]": ">= 1"}
    for override, expected in cases.items():
        with pytest.raises(ConfigError) as e:
            load_config(None, [override])
        assert override.split("=")[0] in str(e.value) and expected in str(e.value), str(e.value)


def test_cross_field_errors():
    with pytest.raises(ConfigError, match="only ZeRO stage 0 or 1"):
        load_config(None, ["parallel.pipeline=2", "parallel.zero_stage=3"])
    with pytest.raises(ConfigError, match="not divisible by model.heads"):
        load_config(None, ["model.hidden=100", "model.heads=3"])


def test_overrides_parse_yaml_values():
    assert parse_overrides(["a.b=3", "a.c=[1, 2]", "d=true", "e=0.5"]) == {
        "a": {"b": 3, "c": [1, 2]}, "d": True, "e": 0.5}
    assert load_config(None, ["optim.lr=1e-3"]).optim.lr == 1e-3  # YAML 1.1 says "1e-3"
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config(None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["novalue"])


def test_base_chain_and_dump_roundtrip(tmp_path):
    cfg = load_config(os.path.join(ROOT, "configs", "ntp_700m.yaml"))
    assert cfg.model.block_shape == [1, 1, 1] and cfg.model.hidden == 1536
    out = tmp_path / "config.yaml"
    dump_config(cfg, str(out))
    assert load_config(str(out)) == cfg


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2]\n")
    with pytest.raises(ConfigError, match="'model': expected a mapping"):
        load_config(str(bad))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_configs_load(path):
    load_config(path)


# Non-embedding parameters from the paper's table (NBP_FACTS.md section 3).
PAPER = {"nbp_700m.yaml": 0.68e9, "nbp_1.2b.yaml": 1.21e9, "nbp_3b.yaml": 3.63e9}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_presets_parameter_counts(dims, name, capsys):
    from nbp_mega import info

    info.main([os.path.join(ROOT, "configs", name)])
    report = json.loads(capsys.readouterr().out)
    assert abs(report["non_embedding_parameters"] / PAPER[name] - 1) < 0.01, report
    cfg = load_config(os.path.join(ROOT, "configs", name)).model
    L, d = cfg.layers, cfg.hidden
    assert report["non_embedding_parameters"] == L * (12 * d * d + 13 * d)
    assert report["sequence_length"] == 1280 - 16 and report["generation_steps_per_clip"] == 79
    assert report["training_flops_per_token"] > 6 * report["non_embedding_parameters"]


def test_ntp_info(dims, capsys):
    from nbp_mega import info

    info.main([os.path.join(ROOT, "configs", "ntp_700m.yaml")])
    report = json.loads(capsys.readouterr().out)
    assert report["block_length"] == 1 and report["generation_steps_per_clip"] == 1279


def test_ucf_hybrid_start_info(dims, capsys):
    """The paper's UCF layout: 8 text ids + 1280 video inputs, 95 generation steps."""
    from nbp_mega import info

    info.main([os.path.join(ROOT, "configs", "nbp_700m_ucf.yaml")])
    report = json.loads(capsys.readouterr().out)
    assert report["sequence_length"] == 8 + 1280 and report["targets_per_clip"] == 1280
    assert report["prefix_length"] == 8 and report["generation_steps_per_clip"] == 16 + 79
