"""Parity with Hugging Face transformers: the same safetensors give the same logits, both ways."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from helpers import small_config, v2_config

import dsv3
from dsv3.errors import CheckpointError
from dsv3.model import DeepseekV3ForCausalLM
from dsv3.model.hf import dequantize_fp8_block, save_pretrained

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "v3-sigmoid-groups-qlora-mtp-yarn": small_config(),
    "v3-no-qlora-no-groups": small_config(q_lora_rank=None, n_group=1, topk_group=1, rope_scaling=None),
    "v3-two-mtp-first-dense-2": small_config(
        num_nextn_predict_layers=2,
        first_k_dense_replace=2,
        num_hidden_layers=4,
        n_routed_experts=16,
        num_experts_per_tok=4,
    ),
    "v2-softmax-greedy": v2_config(),
    "v2-softmax-group-limited": v2_config(
        topk_method="group_limited_greedy", n_group=4, topk_group=2, q_lora_rank=24, routed_scaling_factor=16.0
    ),
}


def hf_class(config):
    return (
        transformers.DeepseekV3ForCausalLM if config.model_type == "deepseek_v3" else transformers.DeepseekV2ForCausalLM
    )


def random_model(config, seed=0):
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(config)
    with torch.no_grad():  # make every tensor matter: biases and norms away from their init
        for moe in model.moe_layers():
            if moe.gate.e_score_correction_bias is not None:
                moe.gate.e_score_correction_bias.normal_(0, 0.05)
            moe.gate.weight.normal_(0, 0.3)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


def load_hf(path, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hf_class(config).from_pretrained(path, dtype=torch.float32)
    return model.eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_dsv3_checkpoint_loads_in_transformers_with_same_logits(tmp_path, name):
    config = CONFIGS[name]
    ours = random_model(config)
    ours.save_pretrained(tmp_path)
    theirs = load_hf(tmp_path, config)
    ids = torch.randint(0, config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(ids).logits - theirs(ids).logits).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformers_checkpoint_loads_in_dsv3_with_same_logits(tmp_path, name):
    config = CONFIGS[name]
    # transformers builds its own random model; it drops MTP modules on save.
    hf_config = transformers.AutoConfig.for_model(**{k: v for k, v in config.to_dict().items() if k != "architectures"})
    torch.manual_seed(3)
    theirs = hf_class(config)(hf_config).eval()
    with torch.no_grad():
        for module in theirs.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.normal_(0, 0.05)
    theirs.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = dsv3.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (ours(ids).logits - theirs(ids).logits).abs().max().item()
    assert diff < 1e-4, diff


def test_round_trip_is_exact_including_mtp(tmp_path):
    config = CONFIGS["v3-two-mtp-first-dense-2"]
    ours = random_model(config, seed=5)
    ours.save_pretrained(tmp_path, max_shard_size="200KB")  # forces several shards + index
    files = sorted(os.listdir(tmp_path))
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    L = config.num_hidden_layers
    for k in range(2):  # the official MTP layout, including the shared-tensor copies
        for part in (
            "enorm.weight",
            "hnorm.weight",
            "eh_proj.weight",
            "shared_head.norm.weight",
            "shared_head.head.weight",
            "embed_tokens.weight",
            "mlp.experts.3.gate_proj.weight",
        ):
            assert f"model.layers.{L + k}.{part}" in index
    back = dsv3.from_pretrained(tmp_path)
    for (n1, t1), (n2, t2) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), n1


def test_fp8_block_checkpoint_is_dequantised(tmp_path):
    from safetensors.torch import load_file, save_file

    config = small_config(hidden_size=160, q_lora_rank=144)  # shapes that are not multiples of 128
    model = random_model(config)
    save_pretrained(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    reference = {}
    for name in list(tensors):
        t = tensors[name]
        if t.dim() == 2 and name.endswith("proj.weight"):
            m, n = t.shape
            rows, cols = -(-m // 128), -(-n // 128)
            scale = torch.rand(rows, cols, dtype=torch.float32) * 1e-3 + 1e-4
            full = scale.repeat_interleave(128, 0)[:m].repeat_interleave(128, 1)[:, :n]
            q = (t / full).clamp(-448, 448).to(torch.float8_e4m3fn)
            tensors[name] = q
            tensors[name[: -len("weight")] + "weight_scale_inv"] = scale
            reference[name] = q.double() * full.double()  # float64 reference of q * s
    save_file(tensors, tmp_path / "model.safetensors")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = dsv3.from_pretrained(tmp_path)
    state = loaded.state_dict()
    checked = 0
    for name, ref in reference.items():
        if ".experts." in name:
            continue
        key = name.replace(f"model.layers.{config.num_hidden_layers}.", "mtp.0.")
        torch.testing.assert_close(state[key].double(), ref, rtol=1e-6, atol=0)
        checked += 1
    assert checked > 10
    assert loaded.config.quantization_config is not None


def test_dequantize_rejects_mismatched_scales():
    with pytest.raises(CheckpointError, match="does not match"):
        dequantize_fp8_block(torch.zeros(256, 128, dtype=torch.float8_e4m3fn), torch.ones(1, 1))


def test_bad_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        dsv3.from_pretrained(tmp_path / "missing")
    config = small_config()
    random_model(config).save_pretrained(tmp_path / "ok")
    # config whose shapes do not match the weights
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    cfg["kv_lora_rank"] = 48
    (tmp_path / "ok" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        dsv3.from_pretrained(tmp_path / "ok")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(config.to_dict()))
    with pytest.raises(CheckpointError, match="no .safetensors"):
        dsv3.from_pretrained(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        dsv3.from_pretrained(tmp_path / "empty")
