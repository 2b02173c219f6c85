"""The trainer's objective: `MatTALoss.streams`, its one-stream form (values and gradients
against a float64 oracle and against the two-stream fused op, the same target checks), and
`Objective`, which runs only the streams the loss reads."""
import pytest
import torch
import torch.nn.functional as F

from matta.losses import MatTALoss
from matta.models import GPT2Config, NestedGPT2, NestingConfig
from matta.ops import DeferredReport
from matta.train import TASKS, make_config
from matta.train.objective import Objective, criterion_for, mode_weights

V, D_S, D_TA = 37, 6, 10


@pytest.mark.parametrize("weights, streams", [
    ((1.0, 1.0, 1.0), ("student", "ta")), ((1.0, 1.0, 0.0), ("student", "ta")), ((0.0, 0.0, 0.5), ("student", "ta")),
    ((1.0, 0.0, 0.0), ("student",)), ((0.0, 2.0, 0.0), ("ta",)),
])
def test_streams(weights, streams):
    assert MatTALoss(weights).streams == streams


def test_criterion_for_modes():
    kw = dict(loss_weights=(1.0, 0.5, 2.0), rampup_steps=3, rampup_start=1, rampup="sigmoid", temperature=2.0)
    assert criterion_for(make_config({"mode": "matta", **kw})).weights == (1.0, 0.5, 2.0)
    student = criterion_for(make_config({"mode": "student", **kw}))
    assert student.weights == (1.0, 0.0, 0.0) and student.streams == ("student",) and student.stream == "student"
    assert student.ramp_at(2) == MatTALoss(rampup_steps=3, rampup_start=1, rampup="sigmoid").ramp_at(2)
    assert student.temperature == 2.0
    assert criterion_for(make_config({"mode": "ta", **kw})).streams == ("ta",)
    assert mode_weights("ta", (1.0, 0.5, 2.0)) == (0.0, 0.5, 0.0)
    report = DeferredReport()
    assert criterion_for(make_config({}), report).report is report


def _inputs(dtype=torch.float32):
    h_s = torch.randn(3, 5, D_S, dtype=dtype, requires_grad=True)
    h_ta = torch.randn(3, 5, D_TA, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, D_TA, dtype=dtype, requires_grad=True)
    bias = torch.randn(V, dtype=dtype, requires_grad=True)
    return h_s, h_ta, weight, bias


def _oracle(h, weight, bias, labels, keep):
    """float64 mean over kept tokens of -sum labels log softmax(h W^T + b)."""
    logits = (h.double() @ weight.double()[:, : h.shape[-1]].T + bias.double()).reshape(-1, V)
    per_token = -(labels * torch.log_softmax(logits, -1)).sum(-1)
    return (per_token * keep).sum() / keep.sum()


@pytest.mark.parametrize("stream", ["student", "ta"])
@pytest.mark.parametrize("labels", ["ids", "probs", "teacher_tuple", "teacher_callable"])
def test_one_stream_matches_float64_oracle(stream, labels):
    h_s, h_ta, weight, bias = _inputs()
    w = 0.7
    loss_fn = MatTALoss((w, 0.0, 0.0) if stream == "student" else (0.0, w, 0.0), ignore_index=-1)
    h = h_s if stream == "student" else h_ta
    ids = torch.randint(0, V, (3, 5))
    ids[0, :2] = -1
    keep = (ids != -1).double().reshape(-1)
    teacher = None
    t_hidden, t_head = torch.randn(3, 5, 4), torch.randn(V, 4)
    if labels == "ids":
        target, y = ids, F.one_hot(ids.clamp(min=0), V).double().reshape(-1, V)
    elif labels == "probs":
        target = torch.softmax(torch.randn(3, 5, V), -1)
        y, keep = target.double().reshape(-1, V), torch.ones(15, dtype=torch.float64)
    else:
        target = ids  # with a teacher, ids only mask tokens
        y = torch.softmax(t_hidden.double().reshape(-1, 4) @ t_head.double().T, -1)
        teacher = (t_hidden, t_head) if labels == "teacher_tuple" else (lambda a, b: (t_hidden.reshape(-1, 4) @ t_head.T)[a:b])
    out = loss_fn.fused_linear(h if stream == "student" else None, h if stream == "ta" else None, weight, target,
                               step=3, bias=bias, teacher=teacher)
    ref = _oracle(h, weight, bias, y, keep)
    part = out.student if stream == "student" else out.ta
    other = out.ta if stream == "student" else out.student
    assert part.item() == pytest.approx(ref.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(w * ref.item(), rel=1e-5)
    assert other.item() == 0.0 and out.distill.item() == 0.0 and out.ramp == 1.0
    out.loss.backward()
    inputs = [t.detach().double().requires_grad_() for t in (h, weight, bias)]
    (w * _oracle(*inputs, y, keep)).backward()
    for got, want in zip((h, weight, bias), inputs):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("stream", ["student", "ta"])
def test_one_stream_equals_that_term_of_the_two_stream_op(stream):
    h_s, h_ta, weight, bias = _inputs(torch.float64)
    weights = (1.0, 0.0, 0.0) if stream == "student" else (0.0, 1.0, 0.0)
    target = torch.randint(0, V, (3, 5))
    both = MatTALoss(weights).fused_linear(h_s, h_ta, weight, target, bias=bias)
    grads_both = torch.autograd.grad(both.loss, (h_s, h_ta, weight, bias), allow_unused=True)
    alone = MatTALoss(weights).fused_linear(h_s if stream == "student" else None, h_ta if stream == "ta" else None,
                                            weight, target, bias=bias)
    torch.testing.assert_close(alone.loss, both.loss)
    used = (h_s,) if stream == "student" else (h_ta,)
    grads_alone = torch.autograd.grad(alone.loss, used + (weight, bias))
    torch.testing.assert_close(grads_alone[0], grads_both[0 if stream == "student" else 1])
    torch.testing.assert_close(grads_alone[1], grads_both[2])
    torch.testing.assert_close(grads_alone[2], grads_both[3])


def test_missing_stream_is_a_clear_error():
    h_s, h_ta, weight, _ = _inputs()
    target = torch.randint(0, V, (3, 5))
    with pytest.raises(ValueError, match="need both streams"):
        MatTALoss((1.0, 1.0, 0.0)).fused_linear(h_s, None, weight, target)
    with pytest.raises(ValueError, match="neither"):
        MatTALoss((1.0, 0.0, 0.0)).fused_linear(None, None, weight, target)
    with pytest.raises(ValueError, match="need both streams"):  # a Student-only loss given only the TA
        MatTALoss((1.0, 0.0, 0.0)).fused_linear(None, h_ta, weight, target)


@pytest.mark.parametrize("mode", ["matta", "student", "ta"])
def test_objective_runs_the_streams_its_loss_reads(mode, monkeypatch):
    model = NestedGPT2(GPT2Config(vocab_size=41, n_positions=16, n_embd=16, n_layer=2, n_head=2),
                       NestingConfig(ffn_ta=96, extra_layers=1))
    seen = []
    real = NestedGPT2.forward

    def spy(self, idx, return_hidden=False, *, stream=None, report=None):
        seen.append(stream)
        return real(self, idx, return_hidden, stream=stream, report=report)

    monkeypatch.setattr(NestedGPT2, "forward", spy)
    objective = Objective(TASKS["lm"], model, criterion_for(make_config({"mode": mode})))
    x, y = torch.randint(0, 41, (2, 8)), torch.randint(0, 41, (2, 8))
    out = objective(x, y)
    assert seen == [{"matta": None, "student": "student", "ta": "ta"}[mode]]
    logits_s, logits_ta = real(model, x)
    ce = [F.cross_entropy(z.reshape(-1, 41), y.reshape(-1)).item() for z in (logits_s, logits_ta)]
    if mode != "ta":
        assert out.student.item() == pytest.approx(ce[0], rel=1e-5)
    if mode != "student":
        assert out.ta.item() == pytest.approx(ce[1], rel=1e-5)


@pytest.mark.parametrize("stream", ["student", "ta"])
@pytest.mark.parametrize("fault, message", [
    ("id_out_of_range", r"class ids must be in \[0, 37\)"), ("negative_id", "ignore_index=-100"),
    ("soft_times_5", "sum to 1"), ("negative_soft", "negative"), ("nan_hidden", "h_(s|ta) contains NaN"),
])
@pytest.mark.parametrize("head", ["fused_linear", "logits"])
def test_one_stream_checks_its_inputs_as_two_streams_do(stream, fault, message, head):
    """A bad target or input never gives one stream a finite, wrong loss: the loss and its
    gradients are NaN and the criterion's report names the problem (no host sync before)."""
    h_s, h_ta, weight, bias = _inputs()
    h = h_s if stream == "student" else h_ta
    criterion = MatTALoss((1.0, 0.0, 0.0) if stream == "student" else (0.0, 1.0, 0.0))
    target = torch.randint(0, V, (3, 5))
    if fault == "id_out_of_range":
        target[1, 2] = V + 3
    elif fault == "negative_id":
        target[0, 0] = -5
    elif fault in ("soft_times_5", "negative_soft"):
        target = torch.softmax(torch.randn(3, 5, V), -1)
        target = target * 5 if fault == "soft_times_5" else target - target.mean(-1, keepdim=True)
    elif fault == "nan_hidden":
        h = h.detach().clone()
        h[2, 1, 0] = float("nan")
        h.requires_grad_()
    pair = (h, None) if stream == "student" else (None, h)
    if head == "fused_linear":
        out = criterion.fused_linear(*pair, weight, target, bias=bias)
    else:
        if fault == "nan_hidden":
            message = "not finite"
        logits = torch.nn.functional.linear(h, weight[:, : h.shape[-1]], bias)
        out = criterion(*((logits, None) if stream == "student" else (None, logits)), target)
    assert torch.isnan(out.loss)
    out.loss.backward()
    assert torch.isnan(h.grad).all()
    with pytest.raises(ValueError, match=message):
        criterion.check_inputs()
    criterion.check_inputs()  # read and cleared


def test_one_stream_on_full_logits_equals_the_fused_head():
    h_s, _, weight, bias = _inputs(torch.float64)
    target = torch.randint(0, V, (3, 5))
    criterion = MatTALoss((1.0, 0.0, 0.0))
    fused = criterion.fused_linear(h_s, None, weight, target, bias=bias)
    logits = torch.nn.functional.linear(h_s, weight[:, :D_S], bias)
    alone = criterion(logits, None, target)
    torch.testing.assert_close(alone.loss, fused.loss, rtol=0, atol=0)
