"""convert() on the real dsv3 model: scope, high-precision exclusions, training numerics vs FP32."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsv3.config import load_preset
from dsv3.fp8 import FP8Linear, FP8Recipe, convert
from dsv3.fp8.linear import FP8GroupedMM, FP8SwiGLU
from dsv3.model import MLP, DeepseekV3ForCausalLM, Experts, RMSNorm, Router

EMU = FP8Recipe(backend="emulated")


def tiny_pair(seed=0):
    torch.manual_seed(seed)
    cfg = load_preset("tiny")
    ref = DeepseekV3ForCausalLM(cfg)
    fp8 = DeepseekV3ForCausalLM(cfg)
    fp8.load_state_dict(ref.state_dict())
    return cfg, ref, convert(fp8, EMU)


def test_tiny_model_conversion_scope():
    cfg, ref, model = tiny_pair()
    names = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    for name, m in ref.named_modules():
        if type(m) is nn.Linear:
            in_blocks = name.startswith("model.layers.") or name.startswith("mtp.")
            assert (name in names) == in_blocks, name
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    for name, m in model.named_modules():
        if isinstance(m, Router):
            assert type(m) is Router and m.weight.dtype == torch.float32
        if isinstance(m, Experts):
            assert isinstance(m.mm, FP8GroupedMM) and isinstance(m.act, FP8SwiGLU), name
        if isinstance(m, MLP):
            assert isinstance(m.act, FP8SwiGLU), name
        if name.endswith("self_attn.o_proj"):
            assert m.input_cache == "e5m6"
    assert any(isinstance(m, RMSNorm) for m in model.modules())
    assert list(model.state_dict()) == list(ref.state_dict())
    assert model.num_parameters() == ref.num_parameters()


def test_tiny_model_forward_backward_close_to_fp32():
    # The median cosine depends on the random model: over seeds 1-5 it spans 0.976-0.984 (both with the
    # old global-RNG init and the per-parameter init); seed 2 sits in the middle of that spread.
    cfg, ref, model = tiny_pair(2)
    ids = torch.randint(0, cfg.vocab_size, (2, 65))
    out_ref = ref(ids[:, :-1], ids[:, 1:])
    out = model(ids[:, :-1], ids[:, 1:])
    assert abs(out.loss.item() - out_ref.loss.item()) / out_ref.loss.item() < 0.005
    assert torch.equal(out.expert_load.sum(-1), out_ref.expert_load.sum(-1))
    out_ref.loss.backward()
    out.loss.backward()
    cosines = []
    for (name, p_ref), p in zip(ref.named_parameters(), model.parameters(), strict=True):
        if p_ref.grad is None:
            assert p.grad is None, name
            continue
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
        cosines.append(F.cosine_similarity(p_ref.grad.flatten(), p.grad.flatten(), dim=0).item())
    assert min(cosines) > 0.8 and torch.tensor(cosines).median().item() > 0.98


def test_converted_model_still_decodes_with_the_latent_cache():
    # seed-dependent: over seeds 0-5 the cosine spans 0.97-0.998 (old and per-parameter init alike)
    cfg, ref, model = tiny_pair(3)
    ids = torch.randint(0, cfg.vocab_size, (1, 9))
    model.eval()
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        cache = model.new_cache(1, 16)
        model(ids[:, :8], cache=cache, start_pos=0)
        step = model(ids[:, 8:], cache=cache, start_pos=8).logits[:, -1]
    # the absorbed decode path multiplies kv_b_proj.weight in high precision: close, not identical
    assert F.cosine_similarity(full, step).item() > 0.99


def test_full_deepseek_v3_converts_on_meta():
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(load_preset("deepseek-v3"))
    convert(model, FP8Recipe())
    fp8 = [m for m in model.modules() if isinstance(m, FP8Linear)]
    # 61 x 5 attention projections + 3 dense x 3 + 58 shared experts x 3 + MTP (5 + 3 + eh_proj)
    assert len(fp8) == 61 * 5 + 3 * 3 + 58 * 3 + 9
    assert [n for n, m in model.named_modules() if type(m) is nn.Linear] == ["lm_head"]


def test_v2_style_model_with_plain_query_projection_converts_and_trains():
    from helpers import v2_config

    torch.manual_seed(3)
    cfg = v2_config()
    ref = DeepseekV3ForCausalLM(cfg)
    model = DeepseekV3ForCausalLM(cfg)
    model.load_state_dict(ref.state_dict())
    convert(model, EMU)
    assert isinstance(model.model.layers[0].self_attn.q_proj, FP8Linear)
    ids = torch.randint(0, cfg.vocab_size, (2, 33))
    loss, loss_ref = model(ids[:, :-1], ids[:, 1:]).loss, ref(ids[:, :-1], ids[:, 1:]).loss
    assert abs(loss.item() - loss_ref.item()) / loss_ref.item() < 0.005
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_train_with_fp8_runs_close_to_fp32_and_resumes(tmp_path):
    """``dsv3 train --fp8``: per-step losses close to FP32, and an interrupted FP8 run resumes.

    (Not bit for bit: two identical FP32 runs of the trainer already differ in the last bits on
    CPU, and FP8 rounding or a near-tie routing choice can amplify that.)
    """
    import numpy as np

    from dsv3.checkpoint.state import list_checkpoints
    from dsv3.train.config import TrainConfig
    from dsv3.train.loop import train
    from dsv3.train.metrics import read_metrics

    data = tmp_path / "tokens.bin"
    np.random.default_rng(0).integers(0, 4096, 40000, dtype=np.uint16).tofile(data)
    common = dict(
        model="tiny",
        data=str(data),
        seq_len=32,
        micro_batch=2,
        global_batch=2,
        steps=4,
        warmup_steps=1,
        fp8_backend="emulated",
        device="cpu",
        eval_every=10**9,
        save_every=2,
        sample_tokens=0,
        tensorboard=False,
        progress=False,
    )

    def losses(run_dir):
        return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]

    def quiet(line):
        pass

    fp32 = train(TrainConfig.from_dict(dict(run_dir=str(tmp_path / "fp32"), fp8=False, **common)), log=quiet)
    full = train(TrainConfig.from_dict(dict(run_dir=str(tmp_path / "full"), fp8=True, **common)), log=quiet)
    l32, l8 = losses(fp32.run_dir), losses(full.run_dir)
    assert len(l8) == 4 and all(abs(a - b) / a < 0.01 for a, b in zip(l32, l8, strict=True))
    assert l8 != l32  # the FP8 run really ran in FP8

    class Stop(Exception):
        pass

    def stop_at_2(step):
        if step == 2:
            raise Stop

    part = str(tmp_path / "part")
    try:
        train(TrainConfig.from_dict(dict(run_dir=part, fp8=True, **common)), log=quiet, step_hook=stop_at_2)
    except Stop:
        pass
    assert [s for s, _ in list_checkpoints(part)] == [2]
    result = train(None, resume=part, log=quiet)
    assert result.step == 4
    resumed = losses(part)
    assert len(resumed) == 4 and all(abs(a - b) / a < 0.005 for a, b in zip(l8, resumed, strict=True))
