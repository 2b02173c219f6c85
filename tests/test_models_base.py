"""What `NestedLM` owns for both families: one stream alone (same values and gradients as
that stream of the two-stream pass, against the float64 oracles), widths and depth,
parameter and FLOP counts, optimizer groups; and `NestedLayerNorm`."""
import pytest
import torch
import torch.nn.functional as F

from matta.extraction import extract
from matta.layers import NestedLayerNorm
from matta.models import NestedGAU, NestedGPT2, NestedLM, NestingConfig
from test_models_gau import reference_gau, tiny_gau
from test_models_gpt2 import perturb_, reference_logits, rel_err, tiny_config

NESTINGS = {
    "depth": NestingConfig(ffn_ta=56, extra_layers=2),
    "d_model": NestingConfig(ffn_ta=64, extra_layers=1, extra_layer_positions="bottom", d_model_ta=40),
}


def make(family, nesting):
    if family == "gpt2":
        model = NestedGPT2(tiny_config(), NESTINGS[nesting])
    else:
        nest = NESTINGS[nesting]
        model = NestedGAU(tiny_gau(n_embd=24), NestingConfig(ffn_ta=40, extra_layers=nest.extra_layers,
                                                             d_model_ta=nest.d_model_ta))
    perturb_(model, scale=0.2)
    return model.eval()


def oracle(model, idx, stream):
    choices = ["skip" if i in model.ta_only_layers else "narrow" for i in range(model.depth)]
    if stream == "ta":
        choices, d = ["wide"] * model.depth, model.ta_width
    else:
        d = model.student_width
    if isinstance(model, NestedGPT2):
        return reference_logits(model, idx, choices, d)
    return reference_gau(model, idx, choices, d)


@pytest.mark.parametrize("nesting", list(NESTINGS))
@pytest.mark.parametrize("family", ["gpt2", "gau"])
def test_one_stream_alone_equals_that_stream_of_both(family, nesting, monkeypatch):
    monkeypatch.setenv("MATTA_BACKEND", "torch")
    model = make(family, nesting)
    idx = torch.randint(0, model.config.vocab_size, (3, 17))
    both = model(idx)
    for which, stream in enumerate(("student", "ta")):
        alone = model(idx, stream=stream)
        assert alone[1 - which] is None
        torch.testing.assert_close(alone[which], both[which], rtol=1e-5, atol=1e-5)
        assert rel_err(alone[which], oracle(model, idx, stream)) < 1e-5
        hidden = model(idx, return_hidden=True, stream=stream)
        assert hidden[1 - which] is None and hidden[which].shape[-1] == (model.student_width, model.ta_width)[which]

    # gradients: the stream alone gives what the two-stream pass gives when only that stream's loss counts
    target = torch.randint(0, model.config.vocab_size, idx.shape)
    for which, stream in enumerate(("student", "ta")):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(idx)[which].flatten(0, 1), target.flatten()).backward()
        grads_both = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(idx, stream=stream)[which].flatten(0, 1), target.flatten()).backward()
        for name, p in model.named_parameters():
            if p.grad is None:  # only the TA-only layers are out of the Student's reach
                assert stream == "student" and any(name.startswith(f"blocks.{i}.") for i in model.ta_only_layers), name
                assert name not in grads_both or grads_both[name].abs().max() == 0
                continue
            torch.testing.assert_close(p.grad, grads_both[name], rtol=1e-4, atol=1e-6, msg=name)


def test_student_stream_never_runs_the_nested_op_or_the_ta(monkeypatch):
    from matta.layers import NestedLinear
    from matta.models import gpt2

    model = make("gpt2", "depth")
    calls = {"forward": 0, "forward_ta": 0}

    def counted(name):
        real = getattr(NestedLinear, name)

        def run(self, *args):
            calls[name] += 1
            return real(self, *args)

        return run

    for name in calls:
        monkeypatch.setattr(NestedLinear, name, counted(name))
    ffn_weights = []  # the one-stream FFN takes its layers' tensors, not the modules
    real_mlp = gpt2.gelu_mlp
    monkeypatch.setattr(gpt2, "gelu_mlp", lambda x, w1, *rest: ffn_weights.append(tuple(w1.shape)) or real_mlp(
        x, w1, *rest))
    model(torch.randint(0, 61, (2, 9)), stream="student")
    assert calls == {"forward": 0, "forward_ta": 0}  # neither the two-stream op nor the TA ran
    student_fc = tuple(model.blocks[model.student_layers[0]].mlp.c_fc.student_parameters()[0].shape)
    assert ffn_weights == [student_fc] * len(model.student_layers)
    ffn_weights.clear()
    model(torch.randint(0, 61, (2, 9)), stream="ta")
    assert calls == {"forward": 0, "forward_ta": 2 * model.depth}  # attention's two layers
    assert ffn_weights == [tuple(model.blocks[0].mlp.c_fc.weight.shape)] * model.depth


def test_bad_stream_is_refused():
    model = make("gpt2", "depth")
    with pytest.raises(ValueError, match="stream must be"):
        model(torch.randint(0, 61, (1, 4)), stream="teacher")


@pytest.mark.parametrize("nesting", list(NESTINGS))
@pytest.mark.parametrize("family", ["gpt2", "gau"])
def test_counts_and_groups(family, nesting):
    model = make(family, nesting)
    assert isinstance(model, NestedLM) and model.depth == len(model.blocks)
    vocab = model.config.vocab_size
    for stream, width in (("student", model.student_width), ("ta", model.ta_width)):
        shape = model.stream_shape(stream)
        plain = extract(model, stream)
        assert shape.d_model == width
        assert shape.n_layer == (model.config.n_layer if stream == "student" else model.depth)
        # every parameter a token meets in a matmul: the extracted model's, plus the tied head
        assert shape.matmul_parameters == plain.num_parameters(non_embedding=True) + vocab * width
    t = 64
    both = model.flops_per_token(t)
    assert both == pytest.approx(model.flops_per_token(t, ("student",)) + model.flops_per_token(t, ("ta",)))
    assert model.flops_per_token(t, ("student",)) > 6 * model.stream_shape("student").matmul_parameters

    groups = model.optimizer_groups(0.1)
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters()))
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and groups[0]["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0
    for p in model.ta_only_parameters():
        p.requires_grad_(False)
    left = [p for g in model.optimizer_groups(0.1) for p in g["params"]]
    assert len(left) == len(grouped) - len(model.ta_only_parameters()) > 0


def test_nested_layer_norm():
    norm = NestedLayerNorm(5, 9, 1e-5)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x_s, x_ta = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64)
    norm.double()
    y_s, y_ta = norm(x_s, x_ta)
    ref_s = F.layer_norm(x_s, (5,), norm.weight[:5], norm.bias[:5], 1e-5)
    torch.testing.assert_close(y_s, ref_s)
    torch.testing.assert_close(norm.forward_student(x_s), ref_s)
    torch.testing.assert_close(y_ta, F.layer_norm(x_ta, (9,), norm.weight, norm.bias, 1e-5))
    torch.testing.assert_close(norm.plain(5)(x_s), ref_s)
    with pytest.raises(ValueError, match="d_s <= d_ta"):
        NestedLayerNorm(10, 9, 1e-5)


@pytest.mark.parametrize("family, stream", [("gpt2", None), ("gau", None), ("gpt2", "student")])
def test_compiled_forward_is_one_graph(family, stream):
    """What `matta train --compile` compiles: the whole forward as one graph, every two-stream
    nested Dense one `matta::nested_linear[_gelu]` node (the FFN's two inside the forward body
    of its autograd.Function), no graph break anywhere."""
    model = make(family, "depth")
    torch._dynamo.reset()
    ex = torch._dynamo.explain(model)(torch.randint(0, model.config.vocab_size, (2, 9)), return_hidden=True,
                                      stream=stream)
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), [b.reason for b in ex.break_reasons]
    forward_graphs = [m.graph for g in ex.graphs for name, m in g.named_modules() if name == "" or
                      name.startswith("fwd_body")]
    nodes = [n for graph in forward_graphs for n in graph.nodes if "nested_linear" in str(n.target)]
    per_layer = 4 if family == "gpt2" else 2
    assert len(nodes) == (per_layer * model.config.n_layer if stream is None else 0)
