"""YaRN context extension: the official rope_scaling form, a built model re-pointed at it, and a
dsv3-written extended checkpoint that transformers reads with the same logits beyond the original context."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from helpers import small_config

from dsv3.config import load_preset
from dsv3.errors import ConfigError
from dsv3.model import DeepseekV3ForCausalLM
from dsv3.model.rope import extend_context, rope_frequencies, softmax_scale
from dsv3.model.transformer import apply_rope_config

OFFICIAL_KEYS = {
    "type",
    "factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
}


def test_extend_context_writes_the_released_v3_form():
    base = small_config(rope_scaling=None, max_position_embeddings=4096)
    ext = extend_context(base, 40, 32768)
    assert ext.rope_scaling == load_preset("deepseek-v3").rope_scaling  # the released config.json's values
    assert set(ext.rope_scaling) == OFFICIAL_KEYS
    assert ext.max_position_embeddings == 163840 == load_preset("deepseek-v3").max_position_embeddings
    assert ext.to_dict()["rope_scaling"]["type"] == "yarn"
    assert base.rope_scaling is None  # a copy, the input is untouched


def test_second_stage_keeps_the_original_length():
    stage1 = extend_context(small_config(rope_scaling=None, max_position_embeddings=4096), 8, 32768)
    stage2 = extend_context(stage1, 32, 131072)
    assert stage2.rope_scaling["original_max_position_embeddings"] == 4096
    assert stage2.rope_scaling["factor"] == 32 and stage2.max_position_embeddings == 131072
    explicit = extend_context(
        small_config(rope_scaling=None, max_position_embeddings=2048), 2.5, 400, original_max_position_embeddings=256
    )
    assert explicit.rope_scaling["original_max_position_embeddings"] == 256
    assert explicit.rope_scaling["factor"] == 2.5 and explicit.max_position_embeddings == 640


@pytest.mark.parametrize("factor, seq_len", [(1, 64), (0.5, 64), (True, 64), (4, 257)])
def test_bad_extension_is_a_config_error(factor, seq_len):
    with pytest.raises(ConfigError):
        extend_context(small_config(rope_scaling=None, max_position_embeddings=64), factor, seq_len)


def test_yarn_frequencies_and_scale_follow_the_paper():
    """inv_freq_i = (1 - r_i) theta_i / s + r_i theta_i with the linear ramp r between the correction
    dimensions of beta_fast/beta_slow; softmax scale (0.1 ln s + 1)^2 / sqrt(d_h + d_h^R) (float64 by hand)."""
    cfg = extend_context(small_config(rope_scaling=None, max_position_embeddings=64), 4, 256)
    d, base, s, L = cfg.qk_rope_head_dim, cfg.rope_theta, 4.0, 64

    def corr(rot):
        return d * math.log(L / (rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(corr(32)), 0), min(math.ceil(corr(1)), d - 1)
    want = []
    for i in range(d // 2):
        theta = base ** (-2 * i / d)
        extrapolate = 1 - min(max((i - low) / (high - low), 0.0), 1.0)
        want.append(theta / s * (1 - extrapolate) + theta * extrapolate)
    inv_freq, amplitude = rope_frequencies(cfg)
    torch.testing.assert_close(inv_freq.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=0)
    assert amplitude == 1.0  # mscale == mscale_all_dim
    assert softmax_scale(cfg) == pytest.approx((0.1 * math.log(s) + 1) ** 2 / math.sqrt(cfg.qk_head_dim))


def test_apply_rope_config_repoints_a_built_model():
    base = small_config(rope_scaling=None, max_position_embeddings=64)
    ext = extend_context(base, 4, 256)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(base).eval()
    fresh = DeepseekV3ForCausalLM(ext).eval()
    fresh.load_state_dict(model.state_dict())
    apply_rope_config(model, ext)
    assert model.config is ext
    ids = torch.randint(0, 512, (1, 200))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, fresh(ids).logits, atol=0, rtol=0)


def test_extended_checkpoint_loads_in_transformers_with_same_logits_beyond_original_context(tmp_path):
    transformers = pytest.importorskip("transformers")
    base = small_config(rope_scaling=None, max_position_embeddings=64)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(base).eval()
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
    apply_rope_config(model, extend_context(base, 4, 256))
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert set(written["rope_scaling"]) == OFFICIAL_KEYS and written["rope_scaling"]["type"] == "yarn"
    assert written["rope_scaling"]["factor"] == 4
    assert written["rope_scaling"]["original_max_position_embeddings"] == 64
    assert written["max_position_embeddings"] == 256
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (2, 256), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_logits, their_logits = model(ids).logits, theirs(ids).logits
    beyond = slice(64, 256)  # positions past the original context
    assert (ours_logits[:, beyond] - their_logits[:, beyond]).abs().max().item() < 1e-4
    # and the extension matters there: without it the logits differ
    plain = DeepseekV3ForCausalLM(base).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (plain(ids).logits[:, beyond] - their_logits[:, beyond]).abs().max().item() > 1e-3
