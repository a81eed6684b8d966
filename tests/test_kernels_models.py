"""model.kernels on whole models, float32: the CPU custom-VJP ops give the same outputs and
parameter gradients as XLA's autodiff of the reference math, for every family and with every
PEFT hook and unscanned, rematerialised layers (the ops one by one: tests/test_kernels.py;
bfloat16: tests/test_kernels_bf16.py)."""
import numpy as np
import pytest

from helpers import close_trees, kernel_outputs_and_grads

FAMILIES = ["gpt-tiny", "bert-tiny", "t5-tiny", "palm-tiny", "llama-tiny"]


@pytest.mark.parametrize("preset", FAMILIES)
def test_family_outputs_and_gradients_match(preset):
    out_x, g_x = kernel_outputs_and_grads(preset, "xla")
    out_c, g_c = kernel_outputs_and_grads(preset, "cpu_custom_vjp")
    for key in out_x:
        np.testing.assert_allclose(np.asarray(out_c[key]), np.asarray(out_x[key]),
                                   atol=2e-5, rtol=1e-4, err_msg=key)
    close_trees(g_x, g_c, 1e-4)


def test_peft_hooks_and_unscanned_remat_match():
    kw = dict(prefix_tokens=3, prompt_tokens=2, adapter_dim=8, scan_layers=False, remat="full")
    _, g_x = kernel_outputs_and_grads("gpt-tiny", "xla", **kw)
    _, g_c = kernel_outputs_and_grads("gpt-tiny", "cpu_custom_vjp", **kw)
    close_trees(g_x, g_c, 1e-4)
