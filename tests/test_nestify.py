"""`nestify` on a small foreign model: the Student computes the original model, the TA
equals its standalone extraction, gradients reach the shared weights, bad patterns raise."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from matta import NestedLinear
from matta.extraction import extract
from matta.nestify import Nestified, nestify


class TinyEncoder(nn.Module):
    """Someone else's model: attention over tokens, LayerNorms on the model width, and a
    two-layer FFN whose hidden width we nest."""

    def __init__(self, d=12, hidden=20, classes=3):
        super().__init__()
        self.embed = nn.Linear(5, d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ffn = nn.ModuleDict({"fc1": nn.Linear(d, hidden), "fc2": nn.Linear(hidden, d)})
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.embed(x)
        a = self.norm1(h)
        att = torch.softmax(self.q(a) @ self.k(a).transpose(1, 2) / a.shape[-1] ** 0.5, -1) @ self.v(a)
        h = h + att
        h = h + self.ffn["fc2"](F.gelu(self.ffn["fc1"](self.norm2(h))))
        return {"logits": self.head(h.mean(1)), "tokens": h}


WIDTHS = {"ffn.fc1": (None, 33), "ffn.fc2": (33, None)}


def test_student_computes_the_original_and_ta_its_extraction():
    original = TinyEncoder().eval()
    nested = nestify(original, WIDTHS).eval()
    assert isinstance(nested.module.ffn["fc1"], NestedLinear)
    assert isinstance(original.ffn["fc1"], nn.Linear) and not isinstance(original.ffn["fc1"], NestedLinear)
    x = torch.randn(4, 7, 5)
    out_s, out_ta = nested(x)
    ref = original(x)
    torch.testing.assert_close(out_s["logits"], ref["logits"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_s["tokens"], ref["tokens"], rtol=1e-5, atol=1e-6)
    ta = extract(nested, "ta")
    assert ta.ffn["fc1"].out_features == 33 and type(ta.ffn["fc1"]) is nn.Linear
    torch.testing.assert_close(out_ta["logits"], ta(x)["logits"], rtol=1e-5, atol=1e-6)
    student = extract(nested, "student")
    torch.testing.assert_close(student(x)["logits"], ref["logits"], rtol=1e-5, atol=1e-6)
    # from_linear zeroes the TA's extra inputs of the Student rows: the TA starts as the Student,
    # and its new units act once those weights move
    torch.testing.assert_close(out_ta["logits"], out_s["logits"], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        nested.module.ffn["fc2"].weight[:, 20:].normal_()
    moved_s, moved_ta = nested(x)
    torch.testing.assert_close(moved_s["logits"], out_s["logits"], rtol=0, atol=0)
    assert not torch.allclose(moved_ta["logits"], out_ta["logits"])


def test_gradients_from_both_streams():
    nested = nestify(TinyEncoder(), {"*fc1": (None, 30), "*fc2": (30, None)})
    with torch.no_grad():
        nested.module.ffn["fc2"].weight[:, 20:].normal_(0.0, 0.1)
    x = torch.randn(3, 6, 5)
    out_s, out_ta = nested(x)
    target = torch.randint(0, 3, (3,))
    fc1 = nested.module.ffn["fc1"]
    F.cross_entropy(out_s["logits"], target).backward()
    student_only = fc1.weight.grad.clone()
    assert torch.count_nonzero(student_only[20:]) == 0 and torch.count_nonzero(student_only[:20]) > 0
    nested.zero_grad()
    out_s, out_ta = nested(x)
    (F.cross_entropy(out_s["logits"], target) + F.cross_entropy(out_ta["logits"], target)).backward()
    assert torch.count_nonzero(fc1.weight.grad[20:]) > 0
    assert nested.module.q.weight.grad is not None and torch.count_nonzero(nested.module.q.weight.grad) > 0


def test_unshared_student():
    nested = nestify(TinyEncoder(), WIDTHS, share_weights=False).eval()
    assert nested.module.ffn["fc1"].student_weight is not None
    x = torch.randn(2, 4, 5)
    out_s, _ = nested(x)
    torch.testing.assert_close(out_s["logits"], extract(nested, "student")(x)["logits"], rtol=1e-5, atol=1e-6)


def test_batch_dim_one():
    class TimeMajor(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):  # (T, B, 4)
            return self.fc2(torch.relu(self.fc1(x))).cumsum(0)

    original = TimeMajor()
    nested = nestify(original, {"fc1": (None, 9), "fc2": (9, None)}, batch_dim=1)
    x = torch.randn(5, 3, 4)
    y_s, y_ta = nested(x)
    torch.testing.assert_close(y_s, original(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y_ta, nested.ta()(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "widths, error, message",
    [
        ({"mlp.*": (None, 40)}, ValueError, "matches no nn.Linear"),
        ({"ffn.fc1": (None, 40), "*fc1": (None, 41)}, ValueError, "matched by two patterns"),
        ({"ffn.fc1": 40}, TypeError, "must be a pair"),
        ({"ffn.fc1": (None, 10)}, ValueError, "must not exceed the TA size"),
        ({}, ValueError, "at least one"),
    ],
)
def test_bad_patterns(widths, error, message):
    with pytest.raises(error, match=message):
        nestify(TinyEncoder(), widths)


def test_misuse_messages():
    nested = nestify(TinyEncoder(), WIDTHS)
    assert isinstance(nested, Nestified)
    with pytest.raises(ValueError, match="call the Nestified wrapper"):
        nested.module.ffn["fc1"](torch.randn(3, 12))
    with pytest.raises(ValueError, match="only 'student' and 'ta'"):
        extract(nested, "wide_narrow_wide", k=2)
    with pytest.raises(TypeError, match="needs an nn.Module"):
        nestify("model", WIDTHS)


def test_hugging_face_conv1d_layers(tmp_path):
    """GPT-2's Conv1D projections (weight stored (in, out)) nest like nn.Linear, and the
    Student comes back as Conv1D layers that the checkpoint layout expects."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_inner=24, n_positions=16)
    original = transformers.GPT2LMHeadModel(config).eval()
    nested = nestify(original, {"*.mlp.c_fc": (None, 41), "*.mlp.c_proj": (41, None)}).eval()
    conv = type(original.transformer.h[0].mlp.c_fc)
    assert isinstance(nested.module.transformer.h[0].mlp.c_fc, NestedLinear)
    idx = torch.randint(0, 50, (3, 9))
    with torch.no_grad():
        ref = original(idx, use_cache=False).logits
        out_s, out_ta = nested(idx, use_cache=False)
    # both streams ride one stacked batch: equal to rounding, not bit for bit (see nestify's docstring)
    torch.testing.assert_close(out_s.logits, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_ta.logits, ref, rtol=1e-5, atol=1e-6)  # new units start with zero outputs
    student = nested.student()
    assert type(student.transformer.h[1].mlp.c_proj) is conv
    student.save_pretrained(tmp_path / "student")
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "student").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(idx).logits, ref)
    assert nested.ta().transformer.h[0].mlp.c_fc.weight.shape == (16, 41)
