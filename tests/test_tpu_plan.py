"""`llmjax plan --target`: llmjax's train step compiled for Cloud TPU topologies by the real
TPU compiler (libtpu, no TPU), its memory per chip, roofline and collectives.

Tests that compile need libtpu (the `tpu` extra, installed in CI) and skip without it;
compiled plans are shared through module fixtures (each compile costs seconds)."""
from __future__ import annotations

import importlib.util
import math

import pytest

from llmjax import cli, config
from llmjax.plan import aot, hlo, topology
from llmjax.plan.topology import parse

needs_libtpu = pytest.mark.skipif(
    not aot.libtpu_available(),
    reason="libtpu is not installed (pip install 'llmjax[tpu]'); CI installs it")

# Tile-aligned llama: every array's two minor dims fill (8, 128) tiles, so the compiler's
# argument bytes carry no layout padding and can be checked exactly.
ALIGNED_LLAMA = ["model.d_model=256", "model.num_heads=2", "model.num_kv_heads=1",
                 "model.d_ff=512", "model.vocab_size=1024", "mesh.data=1", "mesh.fsdp=4",
                 "mesh.tensor=1", "train.batch_size=32"]


def _plan(path, overrides, target="v5e:2x2", slices=1, steps=("train",), save_hlo=None,
          decode=None):
    return aot.plan(config.load(path, overrides), parse(target, slices), steps=steps,
                    save_hlo=save_hlo, decode=decode)


@pytest.fixture(scope="module")
def compiled():
    """The plans several tests read, compiled once."""
    if not aot.libtpu_available():
        pytest.skip("libtpu is not installed (pip install 'llmjax[tpu]'); CI installs it")
    return {
        "gpt-v5e": _plan("configs/experiments/gpt-tiny.yaml", ["mesh.data=1", "mesh.fsdp=2",
                                                              "mesh.tensor=2"],
                         decode={"batch": 4, "context": 64, "prompt": None}),
        "gpt-v4": _plan("configs/experiments/gpt-tiny.yaml", ["mesh.data=2", "mesh.fsdp=2"],
                        "v4:2x2x1"),
        "llama-v4": _plan("configs/experiments/llama-tiny.yaml",
                          ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2"], "v4:2x2x1"),
        "llama-aligned-v5e": _plan("configs/experiments/llama-tiny.yaml", ALIGNED_LLAMA),
    }


@needs_libtpu
@pytest.mark.parametrize("name", ["gpt-v5e", "gpt-v4", "llama-v4", "llama-aligned-v5e"])
def test_train_steps_compile_for_tpu(compiled, name):
    p = compiled[name]
    assert p.fits and p.train is not None
    assert p.target.chip.generation == name.split("-")[-1]
    m = p.train.memory
    assert m.arguments >= m.arithmetic and m.total > m.arguments
    r = p.train.roofline
    assert r.flops > 0 and r.hbm_bytes > 0 and p.step_seconds > 0 and 0 < p.mfu < 1
    # The layer scan runs num_layers times: counted, unlike cost_analysis's body-once flops.
    assert r.flops > 0.5 * p.model_flops


@needs_libtpu
def test_argument_bytes_equal_hand_computation(compiled):
    """fsdp 4 on a v5e 2x2: each weight matrix (all have a d_model axis) is split 4 ways,
    norm scales are replicated; fp32 params + Adam mu + nu; scalars (step, Adam count,
    schedule count, RNG key) take one 128-lane tile (512 bytes) each on TPU."""
    p = compiled["llama-aligned-v5e"]
    d, h, kv, dh, f, v, layers = 256, 2, 1, 128, 512, 1024, 2
    matrices = 2 * v * d + layers * (2 * d * h * dh + 2 * d * kv * dh + 3 * d * f)
    norms = layers * 2 * d + d
    params = (matrices // 4 + norms) * 4
    scalars = 4 * 512
    batch = 3 * (32 // 4) * 128 * 4  # tokens, segment_ids, positions: int32 [32, 128] / 4
    assert p.memory.params == params
    assert p.memory.optimizer == 2 * params + 4 + 4  # mu, nu and two int32 counts
    assert p.train.memory.arguments == 3 * params + scalars + batch


@needs_libtpu
def test_kv_cache_decode_compiles_with_the_generate_shardings(compiled):
    """gpt-tiny's prefill and decode step on v5e 2x2 (fsdp 2 x tensor 2): the cache's rows
    split over fsdp and its heads over tensor; learned positions: a model.max_len cache."""
    from llmjax.plan.report import format_plan
    p = compiled["gpt-v5e"]
    d = p.decode
    assert (d.batch, d.context, d.prompt) == (4, 128, 32)
    layers, heads, dh, fp32 = 2, 4, 16, 4
    rows = 4 // 2
    kv = rows * d.context * (heads // 2) * dh * fp32  # one of key / value, per layer
    segments, index = rows * d.context * 4, 4
    assert d.cache_bytes == layers * (2 * kv + segments + index)
    assert d.param_bytes == p.memory.params  # fp32 (the compute dtype), the training layout
    assert d.step.arguments >= d.param_bytes + d.cache_bytes
    assert d.step.roofline.hbm_bytes >= d.param_bytes + d.cache_bytes  # all read per token
    assert d.token_seconds >= d.floor_seconds > 0 and d.prefill_seconds > 0
    assert any(c.kind == "all-gather" for c in d.step.roofline.collectives)  # fsdp weights
    assert d.tokens_per_second == 4 / d.token_seconds
    text = format_plan(p)
    assert "decode (KV cache; batch 4, context 128 tokens, prompt 32)" in text
    assert "per-token latency" in text and "KV cache" in text


@needs_libtpu
def test_splash_compiles_for_tpu_inside_the_train_step(tmp_path):
    """attention_impl=auto on a TPU target is the Mosaic splash kernel (packed segments +
    causal), compiled for the chip, not interpreted; --save-hlo writes the optimized HLO."""
    p = _plan("configs/experiments/llama-tiny.yaml",
              ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2", "model.attention_impl=auto",
               "train.seq_len=256", "model.max_len=256"], save_hlo=tmp_path / "hlo")
    assert p.attention_impl == "splash"
    text = p.train.hlo_text
    assert "tpu_custom_call" in p.train.roofline.custom_calls
    assert "splash_mqa_fwd_segmented" in text and "splash_mqa_dkv_segmented" in text
    assert p.train.attention_flops > 0
    assert (tmp_path / "hlo" / "train_step.v5e_2x2.hlo.txt").read_text() == text


@needs_libtpu
def test_llama2_70b_adam_on_v5e_8_does_not_fit():
    p = _plan("configs/experiments/llama-tiny.yaml",
              ["model=llama2-70b", "mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1",
               "train.seq_len=2048", "train.batch_size=8"], "v5e-8")
    assert not p.fits and p.train is None
    # fp32 params + Adam: 12 bytes per parameter over 8 chips, against 16 GiB.
    assert p.memory.arithmetic > 12 * 68e9 / 8
    assert p.shortfall == p.memory.arithmetic - 16 * 2 ** 30 > 80 * 2 ** 30


@needs_libtpu
def test_two_slices_put_the_data_axis_over_dcn():
    p = _plan("configs/experiments/gpt-tiny.yaml", ["mesh.data=1", "mesh.fsdp=4",
                                                   "mesh.tensor=1"], "v5e:2x2", slices=2)
    assert p.target.num_chips == 8 and p.mesh == {"data": 2, "fsdp": 4, "expert": 1,
                                                  "context": 1, "tensor": 1}
    dcn = [c for c in p.train.roofline.collectives if c.cross_slice]
    assert dcn and all(c.kind in ("all-reduce", "reduce-scatter", "all-gather") for c in dcn)
    assert p.times()["dcn"] > 0


@needs_libtpu
def test_same_config_and_target_give_the_same_figures(compiled):
    again = _plan("configs/experiments/gpt-tiny.yaml", ["mesh.data=1", "mesh.fsdp=2",
                                                       "mesh.tensor=2"])
    first = compiled["gpt-v5e"]
    assert again.train.memory == first.train.memory
    assert again.times() == first.times()
    assert again.train.roofline.collectives == first.train.roofline.collectives


@needs_libtpu
def test_sweep_ranks_what_fits_and_writes_a_loadable_config(tmp_path, capsys):
    out = tmp_path / "best.yaml"
    code = cli.main(["plan", "configs/experiments/gpt-tiny.yaml", "train.seq_len=64", "--target",
                     "v5e:2x2",
                     "--sweep", "--max-configs", "2", "--best-out", str(out)])
    text = capsys.readouterr()
    assert code == 0, text.err
    assert "rank" in text.out and "[2/2]" in text.err
    cfg = config.load(out)
    assert cfg.train.batch_size % 4 == 0 and cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.tensor == 4


def test_target_names():
    assert parse("v5e-256").shape == (16, 16) and parse("v5litepod-16").num_chips == 16
    assert parse("v4-32").num_chips == 16 and parse("v5p-128").shape == (4, 4, 4)
    assert parse("v6e-256").chip.peak_flops == 918e12
    assert parse("v5e:4x4", 2).num_chips == 32 and parse("v4:2x2x1").topology_name == "v4:2x2x1"


def _error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmjax: error: ") and "\n" not in err
    return err


def test_unknown_topology_lists_the_known_ones(capsys):
    err = _error(capsys, ["plan", "configs/experiments/gpt-tiny.yaml", "--target", "v9x-64"])
    assert "v9x-64" in err and "v5e-" in err and "v5p-" in err and "v6e-" in err


def test_without_libtpu_names_the_extra(capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "libtpu" else real(name, *a))
    err = _error(capsys, ["plan", "configs/experiments/gpt-tiny.yaml", "--target", "v5e-4"])
    assert "pip install 'llmjax[tpu]'" in err


@needs_libtpu
def test_decode_options_that_do_not_fit_fail_before_any_compile(capsys):
    base = ["plan", "configs/experiments/gpt-tiny.yaml", "mesh.data=4", "--target", "v5e-4"]
    err = _error(capsys, base + ["--decode-len", "4096"])
    assert "--decode-len 4096" in err and "model.max_len=128" in err
    err = _error(capsys, base + ["--decode-batch", "6"])
    assert "--decode-batch 6" in err and "(4:" in err


@needs_libtpu
def test_mesh_that_does_not_match_the_chips_names_both_numbers(capsys):
    err = _error(capsys, ["plan", "configs/experiments/gpt-tiny.yaml", "mesh.data=2",
                          "mesh.fsdp=4", "--target", "v5e-4"])
    assert "4 chips" in err and "= 8" in err


HLO = """\
%cond (p: (s32[], f32[8,128])) -> pred[] {
  %p = (s32[], f32[8,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(6)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%fused (a: f32[8,128], b: f32[128,256]) -> f32[8,256] {
  %a = f32[8,128]{1,0} parameter(0)
  %b = f32[128,256]{1,0} parameter(1)
  ROOT %c = f32[8,256]{1,0} convolution(%a, %b), window={size=1}, dim_labels=bf_io->bf
}

%body (p: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {
  %p = (s32[], f32[8,128]{1,0}) parameter(0)
  %w = f32[128,256]{1,0} constant({...})
  %x = f32[8,128]{1,0} get-tuple-element(%p), index=1
  %y = f32[8,256]{1,0} fusion(%x, %w), kind=kOutput, calls=%fused
  %g = f32[16,256]{1,0} all-gather(%y), replica_groups=[2,2]<=[4], dimensions={0}
  ROOT %t = (s32[], f32[8,128]{1,0}) tuple(%i, %x)
}

ENTRY %main (x: f32[8,128]) -> f32[8,128] {
  %x = f32[8,128]{1,0} parameter(0)
  %z = s32[] constant(0)
  %init = (s32[], f32[8,128]{1,0}) tuple(%z, %x)
  ROOT %loop = (s32[], f32[8,128]{1,0}) while(%init), condition=%cond, body=%body
}
"""


def test_roofline_counts_loop_trips_matmul_flops_and_collectives():
    r = hlo.analyze(HLO, peak_flops=1e12, hbm_bandwidth=1e9, slice_of=[0, 0, 1, 1])
    assert r.flops == 6 * 2 * 8 * 256 * 128  # the fusion's matmul, six trips
    per_trip = (8 * 128 + 128 * 256 + 8 * 256) * 4  # operands + output, f32
    assert r.hbm_bytes == 6 * per_trip
    assert math.isclose(r.compute_seconds, 6 * max(2 * 8 * 256 * 128 / 1e12, per_trip / 1e9))
    (gather,) = r.collectives
    assert (gather.kind, gather.group, gather.count, gather.bytes) == ("all-gather", 2, 6,
                                                                       16 * 256 * 4)
    assert not gather.cross_slice  # groups {0,1} and {2,3} each stay in one slice


def test_compiler_out_of_memory_verdicts_are_read():
    """The TPU compiler refuses a program that does not fit; plan() reports its figures
    (a real one: gpt2-small, 16 x 1024 tokens per chip, no remat, on v5e-256)."""
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
               "HLO temporaries (22.12G) exceeds available HBM (15.75G).")
    assert aot._oom_bytes(message) == (int(22.12 * 2 ** 30), int(15.75 * 2 ** 30))
    assert aot._oom_bytes("Used 20.5G of 15.75G hbm") == (int(20.5 * 2 ** 30),
                                                          int(15.75 * 2 ** 30))
    assert aot._oom_bytes("INTERNAL: something else") is None


def test_roofline_counts_the_moe_grouped_matmul_kernel():
    """XLA:TPU lowers jax.lax.ragged_dot (dropless MoE experts) to a Mosaic custom call: each
    of 1024 rows meets one of 8 [64, 64] expert matrices, 2 * 1024 * 64 * 64 FLOPs (the line
    as the TPU compiler wrote it for moe-tiny, backend config cut)."""
    line = ('  %ragged-dot-none = f32[1024,64]{1,0:T(8,128)S(1)} custom-call(%a, %b, %c, %d, %a, '
            '/*index=5*/%x, %w), custom_call_target="tpu_custom_call", operand_layout_'
            'constraints={s32[1]{0}, s32[9]{0}, s32[15]{0}, s32[15]{0}, s32[1]{0}, '
            'f32[1024,64]{1,0}, f32[8,64,64]{2,1,0}}, frontend_attributes={mosaic_fusion_entry_'
            'point="true",ragged_dot_tiling="128,64,64"}, metadata={op_name="ragged-dot-none"}')
    assert hlo.ragged_dot_flops(hlo._parse_instr(line)) == 2 * 1024 * 64 * 64
    other = line.replace(',ragged_dot_tiling="128,64,64"', "")
    assert hlo.ragged_dot_flops(hlo._parse_instr(other)) == 0


ASYNC_HLO = """\
%fused_ag (p0: bf16[64,128], p1: bf16[8,128], p2: bf16[128,256]) -> (f32[8,256], bf16[64,128], bf16[256,128]) {
  %p0 = bf16[64,128]{1,0} parameter(0)
  %p1 = bf16[8,128]{1,0} parameter(1)
  %p2 = bf16[128,256]{1,0} parameter(2)
  %ag = bf16[256,128]{1,0} all-gather(%p0), channel_id=7, replica_groups=[1,4]<=[4], dimensions={0}
  %d = f32[8,256]{1,0} convolution(%p1, %p2), window={size=1}, dim_labels=bf_io->bf
  ROOT %t = (f32[8,256]{1,0}, bf16[64,128]{1,0}, bf16[256,128]{1,0}) tuple(%d, %p0, %ag)
}

%fused_ag2 (q0: bf16[64,128]) -> bf16[256,128] {
  %q0 = bf16[64,128]{1,0} parameter(0)
  ROOT %ag2 = bf16[256,128]{1,0} all-gather(%q0), channel_id=7, replica_groups=[1,4]<=[4], dimensions={0}
}

ENTRY %main (a: bf16[64,128], x: bf16[8,128], w: bf16[128,256], big: bf16[1024,128]) -> bf16[16,128] {
  %a = bf16[64,128]{1,0} parameter(0)
  %x = bf16[8,128]{1,0} parameter(1)
  %w = bf16[128,256]{1,0} parameter(2)
  %big = bf16[1024,128]{1,0} parameter(3)
  %f = (f32[8,256]{1,0}, bf16[64,128]{1,0}, bf16[256,128]{1,0}) fusion(%a, %x, %w), kind=kOutput, calls=%fused_ag
  %f2 = bf16[256,128]{1,0} fusion(%a), kind=kLoop, calls=%fused_ag2
  %s = ((bf16[1024,128]{1,0}), bf16[16,128]{1,0}, u32[]) slice-start(%big), slice={[0:16], [0:128]}
  ROOT %sd = bf16[16,128]{1,0} slice-done(%s)
}
"""


def test_roofline_leaves_out_collective_buffers_carried_through_a_matmul_fusion():
    """XLA:TPU fuses an in-flight all-gather into a matmul (async_collective_fusion): its
    buffers pass through untouched by the matmul and cost ICI time, not HBM bytes; one
    collective split over a chain of such fusions (the same channel_id) counts once; an
    async slice reads and writes only the slice."""
    r = hlo.analyze(ASYNC_HLO, peak_flops=1e12, hbm_bandwidth=1e9, slice_of=[0] * 4)
    matmul = 8 * 128 * 2 + 128 * 256 * 2 + 8 * 256 * 4  # x, w read; f32 result written
    assert r.hbm_bytes == matmul + 2 * 16 * 128 * 2
    assert r.flops == 2 * 8 * 256 * 128
    (gather,) = r.collectives
    assert (gather.kind, gather.group, gather.count, gather.bytes) == ("all-gather", 4, 1,
                                                                       256 * 128 * 2)


def test_splash_flops_per_chip_count_the_context_axis():
    """A context axis splits every row's queries over its chips: each computes 1/context of
    the row's attention (4 t^2 d per head forward, causal half skipped, backward 2x, remat 1x)."""
    from types import SimpleNamespace
    model = SimpleNamespace(num_heads=4, dim_per_head=128, architecture="decoder",
                            num_layers=2, remat="full")

    def flops(context):
        exp = SimpleNamespace(model_config=model, config=SimpleNamespace(
            train=SimpleNamespace(seq_len=1024)), mesh=SimpleNamespace(
                shape={"tensor": 1, "context": context}))
        return aot._attention_flops(exp, "splash", per_chip_rows=2.0)

    forward = 4.0 * 1024 * 1024 * 128 * 4 * 0.5 * 2 * 2.0
    assert flops(1) == forward * 4
    assert flops(4) == forward * 4 / 4
