"""ModelConfig: HF config.json round trips, presets and validation."""

import json

import pytest

from dsv3.config import ModelConfig, list_presets, load_preset, resolve_model_config
from dsv3.errors import ConfigError


def test_presets_load_and_validate():
    assert {"tiny", "small", "deepseek-v3", "deepseek-v2-lite"} <= set(list_presets())
    for name in list_presets():
        cfg = load_preset(name)
        assert cfg.num_key_value_heads == cfg.num_attention_heads


def test_deepseek_v3_preset_is_the_official_config():
    cfg = load_preset("deepseek-v3")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.first_k_dense_replace) == (7168, 61, 3)
    assert (cfg.intermediate_size, cfg.num_attention_heads, cfg.q_lora_rank, cfg.kv_lora_rank) == (
        18432,
        128,
        1536,
        512,
    )
    assert (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim) == (128, 64, 128)
    assert (cfg.n_shared_experts, cfg.n_routed_experts, cfg.moe_intermediate_size) == (1, 256, 2048)
    assert (cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor) == (8, 8, 4, 2.5)
    assert (cfg.vocab_size, cfg.num_nextn_predict_layers) == (129280, 1)
    assert cfg.rope_type == "yarn" and cfg.rope_scaling["factor"] == 40
    assert cfg.rope_scaling["original_max_position_embeddings"] == 4096
    assert cfg.scoring_func == "sigmoid" and cfg.topk_method == "noaux_tc"
    assert cfg.quantization_config["weight_block_size"] == [128, 128]
    assert cfg.num_moe_layers == 58


def test_v2_lite_preset():
    cfg = load_preset("deepseek-v2-lite")
    assert cfg.model_type == "deepseek_v2" and cfg.q_lora_rank is None
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.moe_intermediate_size) == (
        102400,
        2048,
        10944,
        1408,
    )
    assert (cfg.num_hidden_layers, cfg.first_k_dense_replace, cfg.num_attention_heads) == (27, 1, 16)
    assert (cfg.n_routed_experts, cfg.n_shared_experts, cfg.num_experts_per_tok) == (64, 2, 6)
    assert (cfg.scoring_func, cfg.topk_method, cfg.routed_scaling_factor) == ("softmax", "greedy", 1.0)


def test_round_trip_keeps_unknown_keys(tmp_path):
    data = load_preset("deepseek-v3").to_dict()
    data["my_custom_key"] = {"nested": [1, 2]}
    cfg = ModelConfig.from_dict(data)
    assert cfg.extra["my_custom_key"] == {"nested": [1, 2]}
    cfg.save(tmp_path)
    again = json.loads((tmp_path / "config.json").read_text())
    assert again == data
    assert ModelConfig.from_json_file(tmp_path) == cfg


def test_rope_parameters_form_transformers5():
    data = load_preset("tiny").to_dict()
    data.pop("rope_scaling")
    theta = data.pop("rope_theta")
    data["rope_parameters"] = {
        "rope_type": "yarn",
        "rope_theta": theta,
        "factor": 4.0,
        "original_max_position_embeddings": 512,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    }
    cfg = ModelConfig.from_dict(data)
    assert cfg.rope_type == "yarn" and cfg.rope_theta == theta and cfg.rope_scaling["factor"] == 4.0
    assert cfg.to_dict()["rope_parameters"] == data["rope_parameters"]
    assert "rope_scaling" not in cfg.to_dict()


@pytest.mark.parametrize(
    "change, words",
    [
        ({"n_routed_experts": 10, "n_group": 4}, "divisible by n_group"),
        ({"topk_group": 5, "n_group": 4}, "topk_group"),
        ({"num_experts_per_tok": 9, "n_group": 4, "topk_group": 2, "n_routed_experts": 16}, "allowed groups"),
        ({"qk_rope_head_dim": 15}, "even"),
        ({"num_key_value_heads": 2}, "num_key_value_heads"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"scoring_func": "relu"}, "scoring_func"),
        ({"topk_method": "best"}, "topk_method"),
        ({"first_k_dense_replace": 99}, "first_k_dense_replace"),
        ({"q_lora_rank": -1}, "q_lora_rank"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2}}, "rope scaling type"),
    ],
)
def test_validation_one_clear_error(change, words):
    data = load_preset("tiny").to_dict()
    data.update(change)
    with pytest.raises(ConfigError, match=words) as info:
        ModelConfig.from_dict(data)
    assert "\n" not in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        ModelConfig.from_json_file(tmp_path / "nope.json")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json_file(bad)
    with pytest.raises(ConfigError, match="neither a preset"):
        resolve_model_config("no-such-preset")


def test_config_module_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, dsv3, dsv3.config; dsv3.load_preset('tiny'); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_old_config_json_with_the_training_keys_still_loads(tmp_path):
    """gamma, alpha and lambda are no ModelConfig fields any more: an old config.json's keys load into ``extra``,
    are checked, round-trip, and are the trainer's defaults where the run config leaves them unset."""
    from dsv3.train.config import MoEOptions
    from dsv3.train.schedule import MoESchedule

    data = load_preset("tiny").to_dict()
    data.update(bias_update_speed=0.002, seq_aux_alpha=0.0, mtp_loss_weight=0.2)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    cfg = ModelConfig.from_json_file(path)
    assert not hasattr(cfg, "mtp_loss_weight")
    assert cfg.recipe() == {"bias_update_speed": 0.002, "seq_aux_alpha": 0.0, "mtp_loss_weight": 0.2}
    cfg.save(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == json.loads(path.read_text()) | {
        "architectures": ["DeepseekV3ForCausalLM"]
    }
    got = MoESchedule.from_options(MoEOptions(mtp_loss_weight=0.5), 10, cfg.recipe())
    assert (got.gamma, got.seq_aux_alpha, got.mtp_loss_weight) == (0.002, 0.0, 0.5)  # the run's lambda wins
    report = MoESchedule.from_options(MoEOptions(), 10, load_preset("tiny").recipe())
    assert (report.gamma, report.seq_aux_alpha, report.mtp_loss_weight) == (0.001, 0.0001, 0.3)
    for bad in (-1.0, "0.3", None):
        with pytest.raises(ConfigError, match="mtp_loss_weight must be a non-negative number"):
            ModelConfig.from_dict(dict(data, mtp_loss_weight=bad))
