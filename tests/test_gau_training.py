"""GAU training reliability: with the initialisation of `gau_init_` (relative position bias
1/sqrt(n)), every seed of a tiny nested GAU classifier and language model keeps live
attention in every layer and stream, and its loss falls. (With a zero bias, scores start
near 1e-7 and the attention of some layers ends up exactly zero.)"""
import pytest
import torch

import matta.models.gau as gau
from matta.classification import RelevanceTask
from matta.models import GAUConfig, NestedGAU, NestingConfig
from matta.ops.matta_loss import matta_loss

pytestmark = pytest.mark.usefixtures("one_thread")
SEEDS = range(5)


@pytest.fixture
def attention_log(monkeypatch):
    """Records, per call of gau_attention, (mean row sum of A, share of exactly-zero entries
    among the entries the masks allow)."""
    log = []
    original = gau.gau_attention

    def recording(q, k, v, rel_bias, n_positions, causal, key_mask):
        t = q.shape[1]
        scores = q @ k.transpose(-1, -2) / n_positions + rel_bias[gau.relative_positions(t, n_positions, q.device)]
        a = torch.relu(scores).square()
        allowed = torch.ones(t, t, dtype=torch.bool).tril() if causal else torch.ones(t, t, dtype=torch.bool)
        a = a * allowed
        log.append((a.sum(-1).mean().item(), ((a == 0) & allowed).sum().item() / (allowed.sum().item() * a.shape[0])))
        return original(q, k, v, rel_bias, n_positions, causal, key_mask)

    monkeypatch.setattr(gau, "gau_attention", recording)
    return log


def train(model, batches, steps, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.99))
    losses = []
    for step in range(steps):
        x, y = batches(step)
        out = matta_loss(*model(x), y, weights=(1.0, 1.0, 1.0), ramp=1.0)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(out.loss.item())
    return losses


def check_alive(model, x, log, losses, what):
    log.clear()
    with torch.no_grad():
        model(x)
    assert len(log) == 2 * len(model.blocks)  # every layer, Student and TA
    for i, (row_sum, zero_share) in enumerate(log):
        assert row_sum > 0.05 and zero_share < 0.95, f"{what}: attention {i} is (nearly) dead: row sum {row_sum:.2e}, {zero_share:.0%} zeros"
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.02, f"{what}: the loss did not fall ({first:.4f} -> {last:.4f})"


@pytest.mark.parametrize("seed", SEEDS)
def test_classifier_attention_stays_alive(seed, attention_log):
    task = RelevanceTask(vocab_size=32, user_len=4, item_len=4, features=4)
    torch.manual_seed(seed)
    config = GAUConfig(vocab_size=task.vocab_size, n_positions=task.seq_len, n_embd=16, n_layer=2, expansion=8,
                       attn_dim=8, num_classes=2)
    model = NestedGAU(config, NestingConfig(ffn_ta=16))
    stream = task.batches(seed)
    losses = train(model, lambda step: stream.batch(step, 32), steps=40, lr=1e-2)
    check_alive(model, task.examples("val", 64), attention_log, losses, f"classifier seed {seed}")


@pytest.mark.parametrize("seed", SEEDS)
def test_language_model_attention_stays_alive(seed, attention_log):
    torch.manual_seed(seed)
    config = GAUConfig(vocab_size=32, n_positions=32, n_embd=16, n_layer=2, expansion=16, attn_dim=8)
    model = NestedGAU(config, NestingConfig(ffn_ta=32))
    # A sequence task that needs attention: each row repeats a random 8-token motif.
    gen = torch.Generator().manual_seed(1000 + seed)

    def batches(step):
        motif = torch.randint(0, 32, (16, 8), generator=gen)
        rows = motif.repeat(1, 5)[:, :33]
        return rows[:, :-1], rows[:, 1:]

    losses = train(model, batches, steps=40, lr=1e-2)
    check_alive(model, batches(0)[0], attention_log, losses, f"language model seed {seed}")
