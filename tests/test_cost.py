"""The traced cost model (matta/costmodel): per-op formulas, the traced step, pricing, `matta cost`."""
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from matta import cli
from matta.costmodel import (CARDS, DeviceCard, StepTracer, card_for_cuda_device, fake_device_tracing, load_card,
                             new_fake_mode, trace_training_step)
from matta.costmodel.formulas import COLLECTIVE, GELU_EXP_EQUIVALENTS, GEMM, OpCost, op_cost
from matta.costmodel.predict import ddp_buckets, predict, price, ring_all_reduce
from matta.ops.nested_linear import _torch_backward, _torch_forward, nested_linear
from matta.train import build_model, make_config


def trace(fn, *shapes, card_kind="gpu", dtype=torch.float32, requires_grad=False):
    """Records of fn(*fake tensors of `shapes`)."""
    fake_mode = new_fake_mode()
    with fake_mode:
        tensors = [torch.empty(s, dtype=dtype, requires_grad=requires_grad) for s in shapes]
    tracer = StepTracer(card_kind)
    with fake_device_tracing(fake_mode, tracer):
        fn(*tensors)
    return tracer.records


def only(records, op):
    found = [r.cost for r in records if r.cost.op == op]
    assert len(found) == 1, [r.cost.op for r in records]
    return found[0]


def test_gemm_flops_and_bytes_are_exact():
    m, k, n = 37, 53, 29
    mm = only(trace(lambda a, b: a @ b, (m, k), (k, n)), "aten::mm")
    assert (mm.kind, mm.flops, mm.read, mm.written, mm.launches) == (GEMM, 2 * m * n * k, 4 * (m * k + k * n), 4 * m * n, 1)
    bmm = only(trace(lambda a, b: torch.bmm(a, b), (3, m, k), (3, k, n), dtype=torch.bfloat16), "aten::bmm")
    assert (bmm.flops, bmm.dtype, bmm.read) == (2 * 3 * m * n * k, "bf16", 2 * 3 * (m * k + k * n))
    addmm = only(trace(lambda c, a, b: c.addmm_(a, b), (m, n), (m, k), (k, n)), "aten::addmm_")
    assert addmm.read == 4 * (m * n + m * k + k * n) and addmm.written == 4 * m * n  # beta = 1 reads the output


def test_views_and_allocations_are_free_and_copies_move_bytes():
    records = trace(lambda x: (x.reshape(-1)[:10].view(2, 5), x.t()[1:], torch.empty_like(x), x.t().contiguous()), (7, 9))
    assert [r.cost.op for r in records] == ["aten::clone"]
    assert (records[0].cost.read, records[0].cost.written) == (4 * 63, 4 * 63)
    fill = only(trace(lambda x: x.zero_(), (7, 9)), "aten::zero_")
    assert (fill.read, fill.written) == (0, 4 * 63)
    broadcast = only(trace(lambda x, y: x + y.expand(7, 9), (7, 9), (1, 9)), "aten::add")
    assert broadcast.read == 4 * (63 + 9)  # a broadcast row is read once


def test_multi_tensor_ops_count_launches_per_device():
    shapes = [(300, 300)] * 40 + [(7,)] * 80
    fake_mode = new_fake_mode()
    with fake_mode:
        params = [torch.empty(s) for s in shapes]
    for kind, expected in (("gpu", max(math.ceil(120 / 110), math.ceil((40 * 2 + 80) / 320))), ("cpu", 120)):
        tracer = StepTracer(kind)
        with fake_device_tracing(fake_mode, tracer):
            torch._foreach_mul_(params, 0.5)
        assert only(tracer.records, "aten::_foreach_mul_").launches == expected


def test_causal_attention_flops():
    b, h, s, d = 2, 3, 17, 8
    fwd = [r.cost for r in trace(lambda q: F.scaled_dot_product_attention(q, q, q, is_causal=True), (b, h, s, d))
           if r.cost.kind == "attention"]
    assert len(fwd) == 1 and fwd[0].launches == 1
    assert fwd[0].flops == pytest.approx(4 * b * h * s * d * s * (s + 1) / (2 * s))


@pytest.mark.parametrize("shared", [True, False])
def test_nested_linear_formula_matches_the_gemms_of_its_pytorch_path(shared):
    """The custom op's FLOPs on a GPU (one launch) equal the sum over the GEMMs its PyTorch
    path issues, forward and backward, two inputs."""
    t, (n_ta, m_ta), (n_s, m_s) = 23, (40, 24), (15, 11)
    fake_mode = new_fake_mode()
    with fake_mode:
        x_s, x_ta = torch.empty(t, m_s, requires_grad=True), torch.empty(t, m_ta, requires_grad=True)
        w, b = torch.empty(n_ta, m_ta, requires_grad=True), torch.empty(n_ta, requires_grad=True)
        sw = None if shared else torch.empty(n_s, m_s, requires_grad=True)
        sb = None if shared else torch.empty(n_s, requires_grad=True)
    tracer = StepTracer("gpu")
    with fake_device_tracing(fake_mode, tracer):
        y_s, y_ta = nested_linear(x_s, x_ta, w, b, student_features=(n_s, m_s), student_weight=sw, student_bias=sb)
        (y_s.sum() + y_ta.sum()).backward()
    forward = only(tracer.records, "matta::nested_linear")
    backward = only(tracer.records, "matta::nested_linear_backward")
    assert forward.launches == 1 and backward.launches >= 2
    reference = StepTracer("cpu")
    with fake_device_tracing(fake_mode, reference):
        _torch_forward(x_s, x_ta, w, b, sw, sb, n_s, m_s, False)
        _torch_backward(torch.empty_like(y_s), torch.empty_like(y_ta), x_s, x_ta, w, sw, n_s, m_s, False,
                        (True, True, True, True, not shared, not shared))
    gemm_flops = sum(r.cost.flops for r in reference.records if r.cost.kind == GEMM)
    assert forward.flops + backward.flops == gemm_flops


def test_price_is_the_roofline_plus_launches():
    card = DeviceCard(name="t", kind="gpu", peak_flops={"bf16": 100.0}, vector_flops=10.0, bandwidth=50.0,
                      launch=0.5, e_c=0.5, e_m=0.5)
    compute_bound = OpCost("g", GEMM, flops=1000.0, read=10.0, written=0.0, launches=2, dtype="bf16")
    assert price(compute_bound, card).total == pytest.approx(1000 / 50 + 2 * 0.5)
    memory_bound = OpCost("m", "memory", flops=1.0, read=300.0, written=200.0, launches=1)
    assert price(memory_bound, card).total == pytest.approx(500 / 25 + 0.5)


def test_tanh_gelu_is_priced_in_exp_equivalents():
    """GELU's tanh form: GELU_EXP_EQUIVALENTS per element at the card's vector rate, as an op of
    its own or (on a CPU) after the products of the nested FFN op, whose GPU kernel has none."""
    x = torch.randn(6, 5)
    gelu = op_cost(torch.ops.aten.gelu.default, (x,), {"approximate": "tanh"}, x, "cpu")
    exact = op_cost(torch.ops.aten.gelu.default, (x,), {}, x, "cpu")
    assert gelu.flops == GELU_EXP_EQUIVALENTS * x.numel() and exact.flops == x.numel()
    card = DeviceCard(name="cpu", kind="cpu", peak_flops={"fp32": 1e9}, vector_flops=1e8, bandwidth=1e12)
    t, d, f = 64, 8, 16
    x_s, x_ta, w = torch.randn(t, d), torch.randn(t, d), torch.randn(f, d)
    args = (x_s, x_ta, w, None, None, None, f, d)
    costs = {kind: op_cost(torch.ops.matta.nested_linear_gelu.default, args, {}, None, kind) for kind in ("cpu", "gpu")}
    assert costs["gpu"].element_flops == 0
    assert costs["cpu"].element_flops == GELU_EXP_EQUIVALENTS * t * 2 * f
    gemm_only = dataclasses.replace(costs["cpu"], element_flops=0.0)
    assert price(costs["cpu"], card).total - price(gemm_only, card).total == pytest.approx(
        GELU_EXP_EQUIVALENTS * t * 2 * f / 1e8)


def test_a_gemm_curve_slows_thin_products():
    card = DeviceCard(name="t", kind="cpu", peak_flops={"fp32": 100.0}, bandwidth=1e9,
                      gemm_curve=[(64, 0.25), (256, 0.5), (1024, 1.0)])
    assert [card.gemm_share(d) for d in (0, 16, 64, 128, 256, 1024, 4096)] == pytest.approx(
        [1.0, 0.25, 0.25, 0.375, 0.5, 1.0, 1.0])
    thin = OpCost("g", GEMM, flops=100.0, read=0.0, written=0.0, launches=0, min_dim=128)
    assert price(thin, card).total == pytest.approx(100 / (0.375 * 100))
    assert only(trace(lambda a, b: a @ b, (300, 40), (40, 500)), "aten::mm").min_dim == 40


def test_ring_all_reduce_and_ddp_buckets():
    card = CARDS["h100"]
    b = 100e6
    assert ring_all_reduce(b, 1, card) == 0
    assert ring_all_reduce(b, 8, card) == pytest.approx(2 * 7 / 8 * b / (card.e_net * card.link) + 14 * card.net_latency)
    sizes = ddp_buckets([(2**20, 4)] * 30)  # 30 tensors of 4 MiB, reversed: 1 MiB cap first, then 25 MiB
    assert sizes[0] == 4 * 2**20 and sum(sizes) == 30 * 4 * 2**20 and all(s <= 28 * 2**20 for s in sizes)


TINY = dict(n_layer=2, n_embd=32, n_head=2, ffn=64, ffn_ta=128, extra_layers=1, block_size=16, batch_size=4)


@pytest.mark.parametrize("mode", ["matta", "student"])
def test_traced_step_counts_the_model_flops(mode):
    """The traced GEMM FLOPs of forward, loss and backward are 6 per matrix weight and token of
    the streams trained: the count MFU uses, less its vectors (biases, LayerNorms)."""
    cfg = make_config(dict(TINY, mode=mode))
    tr = trace_training_step(cfg, 97, CARDS["h100"])
    gemm = sum(r.cost.flops for r in tr.records if r.cost.kind == GEMM and r.phase != "optimizer")
    with torch.device("meta"):
        model = build_model(cfg, 97)
    streams = ("student", "ta") if mode == "matta" else ("student",)
    six_n = sum(6 * model.stream_shape(s).matmul_parameters for s in streams) * tr.tokens
    configs = [model.config if s == "student" else model.ta_config for s in streams]
    vectors = sum(2 * c.n_embd + c.n_layer * (9 * c.n_embd + c.n_inner) for c in configs)  # GPT-2's biases, norms
    assert gemm == six_n - 6 * vectors * tr.tokens
    assert {r.phase for r in tr.records} >= {"forward", "loss", "backward", "optimizer"}
    assert tr.syncs == 0 and tr.amp_dtype == "bf16"


def test_gpu_trace_runs_the_gpu_branches():
    """On a GPU card the loss row pass is one launch per chunk, the nested layers one op each
    and GELU no pass of its own."""
    cfg = make_config(TINY)
    gpu = trace_training_step(cfg, 97, CARDS["h100"])
    cpu = trace_training_step(cfg, 97, dataclasses.replace(CARDS["h100"], kind="cpu"))
    ops = lambda tr: {r.cost.op for r in tr.records}  # noqa: E731
    assert "matta_cost::loss_rows" in ops(gpu) and "matta_cost::loss_rows" not in ops(cpu)
    assert "aten::_log_softmax" in ops(cpu) and "aten::_log_softmax" not in ops(gpu)
    # Every FFN, the TA-only layer's too, computes GELU in the nested kernels' epilogues.
    assert {"aten::gelu", "aten::gelu_backward"} <= ops(cpu) and not {"aten::gelu", "aten::gelu_backward"} & ops(gpu)
    assert gpu.amp_dtype == "bf16" and cpu.amp_dtype == "fp32"
    # The nested kernels write the FFN parameters' fp32 gradients: the backward casts none.
    casts = {r.cost.shape for r in gpu.records if r.phase == "backward" and r.cost.op == "aten::_to_copy"}
    assert not {"(128, 32)", "(32, 128)", "(128,)"} & casts, casts


def test_shampoo_root_step_is_traced_and_amortised():
    cfg = make_config(dict(TINY, optimizer="shampoo", precondition_frequency=5))
    tr = trace_training_step(cfg, 97, CARDS["h100"], newton_iterations=3)
    assert tr.root_records
    assert any(r.cost.op == "aten::bmm" for r in tr.root_records)  # batched Newton on a GPU
    pred = predict(tr, world=1)
    assert pred.root_extra > 0 and pred.frequency == 5
    steady = sum(price(r.cost, CARDS["h100"]).total for r in tr.records if r.phase == "optimizer")
    assert pred.phases["optimizer"] == pytest.approx(steady + pred.syncs * CARDS["h100"].sync + pred.root_extra / 5)


def test_ddp_adds_exposed_communication():
    cfg = make_config(TINY)
    tr = trace_training_step(cfg, 97, CARDS["a100"])
    one, eight = predict(tr, world=1), predict(tr, world=8)
    assert one.phases["communication"] == 0 and eight.phases["communication"] > 0
    assert eight.comm_total >= eight.phases["communication"]
    assert eight.tokens_per_second > one.tokens_per_second


def test_shampoo_under_ddp_is_traced_as_one_rank_of_its_share():
    cfg = make_config(dict(TINY, optimizer="shampoo", precondition_frequency=5, block_size=32))
    one = trace_training_step(cfg, 97, CARDS["h100"], newton_iterations=3)
    two = trace_training_step(cfg, 97, CARDS["h100"], world=2, newton_iterations=3)
    assert not torch.distributed.is_initialized()  # the fake process group is gone again

    def factor_blocks(tr):  # blocks of each batched product of the steady step
        return [int(r.cost.shape.strip("(").split(",")[0]) for r in tr.records
                if r.phase == "optimizer" and r.cost.op == "aten::bmm"]

    assert factor_blocks(one) and factor_blocks(two) == [-(-n // 2) for n in factor_blocks(one)]  # rank 0's share
    collectives = [r.cost for r in two.records if r.cost.kind == COLLECTIVE]
    assert collectives and all(c.wire > 0 and c.net_steps == 1 for c in collectives)  # ring of 2: 1 step
    assert not [r for r in one.records if r.cost.kind == COLLECTIVE]
    gather = price(collectives[0], CARDS["h100"])
    assert gather.total == pytest.approx(collectives[0].wire / (0.8 * CARDS["h100"].link) + 10e-6 + 4e-6)
    assert predict(two, world=2).phases["optimizer"] > sum(price(c, CARDS["h100"]).total for c in collectives)
    with pytest.raises(ValueError, match="trace with world=4"):
        predict(two, world=4)
    adamw = trace_training_step(make_config(TINY), 97, CARDS["h100"])
    assert predict(adamw, world=4).world == 4  # AdamW's step does not depend on the world: one trace prices all


def test_a_torch_without_the_fake_process_group_is_one_line(monkeypatch):
    import sys

    from matta.train.config import ConfigError

    monkeypatch.setitem(sys.modules, "torch.testing._internal.distributed.fake_pg", None)  # import fails
    cfg = make_config(dict(TINY, optimizer="shampoo"))
    with pytest.raises(ConfigError, match="no fake process group.*--gpus 1"):
        trace_training_step(cfg, 97, CARDS["h100"], world=2)


@pytest.mark.parametrize("card_kind", ["gpu", "cpu"])
def test_tf32_factor_products_are_priced_as_tf32_on_a_gpu_only(card_kind):
    card = dataclasses.replace(CARDS["h100"], kind=card_kind)
    cfg = make_config(dict(TINY, optimizer="shampoo", shampoo_factor_matmul="tf32"))
    tr = trace_training_step(cfg, 97, card, newton_iterations=3)
    assert not torch.backends.cuda.matmul.allow_tf32  # restored after the trace
    steady = [r.cost.dtype for r in tr.records if r.phase == "optimizer" and r.cost.op == "aten::bmm"]
    # Per pack of blocks two products G G^T, G^T G (TF32 on a GPU) and two of L^-1/4 G R^-1/4 (fp32).
    assert steady and steady.count("fp32") == (len(steady) // 2 if card_kind == "gpu" else len(steady))
    assert steady.count("tf32") == (len(steady) // 2 if card_kind == "gpu" else 0)


def test_cards_and_overrides():
    assert load_card("H100") is CARDS["h100"]
    card = CARDS["h200"].with_efficiencies(e_c=0.5, launch=0.0)
    assert (card.e_c, card.launch, card.bandwidth) == (0.5, 0.0, CARDS["h200"].bandwidth)
    with pytest.raises(ValueError, match="e_m must be > 0"):
        CARDS["h100"].with_efficiencies(e_m=0)
    with pytest.raises(ValueError, match="unknown card 'h900'"):
        load_card("h900")
    for name, key in (("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100")):
        assert card_for_cuda_device(name) is CARDS[key]
    with pytest.raises(ValueError, match="no card for CUDA device 'Tesla T4'"):
        card_for_cuda_device("Tesla T4")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--card auto"):
            load_card("auto")


def test_card_file_round_trips(tmp_path):
    path = tmp_path / "card.json"
    path.write_text(CARDS["a100"].to_json())
    assert load_card(str(path)) == CARDS["a100"]
    path.write_text('{"name": "x"}')
    with pytest.raises(ValueError, match="not a DeviceCard JSON|kind must be"):
        load_card(str(path))


def test_matta_cost_command(capsys, tmp_path):
    out = tmp_path / "pred.json"
    argv = ["cost", "--model", "gpt2-tiny", "--n-layer", "2", "--block-size", "16", "--batch-size", "2",
            "--vocab-size", "97", "--card", "a100", "--gpus", "2", "--json", str(out)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "PREDICTED" in text and "predicted tokens/s" in text and "communication" in text
    assert json.loads(out.read_text())["predicted"] is True
    assert cli.main(["cost", "--card", "nope"]) == 2
    assert "unknown card 'nope'" in capsys.readouterr().err


# ---- the overhead goal: passes the traced step showed to be needless, removed exactly


def backward_ops(build):
    """The aten ops of forward and backward of `fn(*inputs)`, where `build()` (run on fake
    tensors) makes the module and returns (fn, inputs)."""
    fake_mode = new_fake_mode()
    with fake_mode:
        fn, inputs = build()
    tracer = StepTracer("gpu")
    with fake_device_tracing(fake_mode, tracer):
        fn(*inputs).sum().backward()
    return [r.cost.op for r in tracer.records]


@pytest.mark.parametrize("d_s", [24, 17])  # without and with d_model nesting
def test_nested_layer_norm_student_gradients_are_exact_without_a_slice(d_s):
    from matta.layers import NestedLayerNorm

    d = 24
    ln = NestedLayerNorm(d_s, d, 1e-5)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x_s, x_ta = torch.randn(5, 3, d_s, dtype=torch.float64), torch.randn(5, 3, d, dtype=torch.float64)
    ln = ln.double()
    g_s, g_ta = torch.randn_like(x_s), torch.randn_like(x_ta)
    y_s, y_ta = ln(x_s, x_ta)
    ((y_s * g_s).sum() + (y_ta * g_ta).sum()).backward()
    w, b = (p.detach().clone().requires_grad_() for p in (ln.weight, ln.bias))  # the slicing formulation
    ref_s = F.layer_norm(x_s, (d_s,), w[:d_s], b[:d_s], 1e-5)
    ref_ta = F.layer_norm(x_ta, (d,), w, b, 1e-5)
    ((ref_s * g_s).sum() + (ref_ta * g_ta).sum()).backward()
    assert torch.equal(y_s, ref_s) and torch.equal(ln.weight.grad, w.grad) and torch.equal(ln.bias.grad, b.grad)
    ops = backward_ops(lambda: (NestedLayerNorm(d_s, d, 1e-5).forward_student, [torch.empty(4, d_s)]))
    assert ("aten::slice_backward" in ops) == (d_s < d)


@pytest.mark.parametrize("student", [(24, 16), (11, 16)])  # the whole weight (attention), a block (FFN)
def test_student_stream_of_a_nested_linear_is_exact_without_a_slice(student):
    from matta.layers import NestedLinear

    (n_s, m_s), (n_ta, m_ta) = student, (24, 16)
    layer = NestedLinear((m_s, m_ta), (n_s, n_ta)).double()
    x = torch.randn(7, m_s, dtype=torch.float64)
    g = torch.randn(7, n_s, dtype=torch.float64)
    (layer.forward_student(x) * g).sum().backward()
    w, b = (p.detach().clone().requires_grad_() for p in (layer.weight, layer.bias))
    (F.linear(x, w[:n_s, :m_s], b[:n_s]) * g).sum().backward()
    assert torch.equal(layer.weight.grad, w.grad) and torch.equal(layer.bias.grad, b.grad)
    ops = backward_ops(lambda: (NestedLinear((m_s, m_ta), (n_s, n_ta)).forward_student, [torch.empty(7, m_s)]))
    assert ("aten::slice_backward" in ops) == ((n_s, m_s) != (n_ta, m_ta))


# Launches of the tiny model's traced GPU step (forward, backward) per mode: counts, exact on
# any machine. A change that adds a pass fails here; one that removes passes lowers the budget.
# One stream (student, ta): one backward launch scales by the loss's poison factor (1, or NaN
# after a failed input check), so that a bad target cannot give a finite gradient.
# Every mode: 6 forward launches and 1 backward check the token ids on the GPU (ids outside
# the vocabulary get NaN rows and a deferred report instead of a device assert).
LAUNCH_BUDGET = {"matta": (65, 117), "student": (42, 90), "ta": (57, 97)}


@pytest.mark.parametrize("mode", list(LAUNCH_BUDGET))
def test_launch_budget_of_a_step(mode):
    tr = trace_training_step(make_config(dict(TINY, mode=mode)), 97, CARDS["h100"])
    launches = {phase: sum(r.cost.launches for r in tr.records if r.phase == phase) for phase in ("forward", "backward")}
    forward, backward = LAUNCH_BUDGET[mode]
    assert launches["forward"] <= forward and launches["backward"] <= backward, (
        f"{mode}: {launches} launches against a budget of forward {forward}, backward {backward}; a change that "
        "adds kernels must say why here (matta cost --where shows which ops)")
