"""Zero host syncs in a training step (issue 19, part 2): `Run.train_step` traced on fake tensors.

The run is set up for real on a tiny model; then its parameters, batches and device
bookkeeping become FakeTensors (shapes, no data) and `StepTracer` watches every op of a few
steps: any read of a device value on the host (`.item()`, `.tolist()`, `bool(t)`, a copy
that is then read, an op whose output shape depends on values) is recorded with its line.
On a GPU each of these would stall the step until the device caught up.
"""
import pytest
import torch
from torch import nn

from matta.costmodel import StepTracer, fake_device_tracing, new_fake_mode
from matta.train import Run, make_config
from matta.train.optimizers import build_optimizer

class FakeBatches:
    """The run's batches, handed to the step as fake device tensors (on a GPU they live there)."""

    def __init__(self, batches, fake_mode):
        self.batches, self.fake_mode = batches, fake_mode

    def take(self, step):
        return [(self.fake_mode.from_tensor(x), self.fake_mode.from_tensor(y)) for x, y in self.batches.take(step)]

    def prefetch(self, step):
        self.batches.prefetch(step)


def fake_run(run: Run, fake_mode):
    """Moves a set-up run onto fake tensors: parameters, batches, the device flag of the trainer,
    and an optimizer rebuilt over the fake parameters."""
    fakes = {}
    for module in run.model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in fakes:
                    fakes[id(p)] = nn.Parameter(fake_mode.from_tensor(p.detach()), requires_grad=p.requires_grad)
                module._parameters[name] = fakes[id(p)]
    run.optimizer = run.schedule.optimizer = build_optimizer(run.cfg, run.model)
    run.batches = FakeBatches(run.batches, fake_mode)
    run._all_finite = fake_mode.from_tensor(run._all_finite)


def host_reads_of_steps(tmp_path, corpus, steps=4, **overrides):
    values = dict(
        out=str(tmp_path / "run"), data=str(corpus), tokenizer="bytes", n_layer=2, n_embd=32, n_head=2, ffn=64,
        ffn_ta=128, extra_layers=1, block_size=16, batch_size=2, grad_accum=2, max_steps=10, warmup_steps=1,
        log_interval=1, eval_interval=0, checkpoint_interval=0, eval_tokens=64, progress=False, rampup_steps=2,
        threads=1, precondition_frequency=2, start_preconditioning_step=2, dropout=0.1, family=False,
    )
    values.update(overrides)
    run = Run(make_config(values), log=lambda *a, **k: None)
    run.setup()
    fake_mode = new_fake_mode()
    fake_run(run, fake_mode)
    tracer = StepTracer("gpu")
    with fake_device_tracing(fake_mode, tracer):
        for _ in range(steps):  # Shampoo: roots at steps 2 and 4, preconditioned steps between
            run.train_step()
    assert tracer.records, "the tracer saw no device op: the step did not run on the fake tensors"
    return tracer.host_reads


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "shampoo"])
@pytest.mark.parametrize("mode", ["matta", "student", "ta"])
def test_a_training_step_never_syncs_with_the_host(tmp_path, corpus, mode, optimizer):
    reads = host_reads_of_steps(tmp_path, corpus, mode=mode, optimizer=optimizer)
    assert not reads, f"{len(reads)} host read(s) in {mode}/{optimizer} steps:\n" + "\n".join(
        sorted({f"  {r.op} {list(r.shape)} at {r.where}" for r in reads}))


def test_the_tracer_catches_every_kind_of_host_read():
    """The detector itself: each way of reading a device value is caught; host work is not."""
    fake_mode = new_fake_mode()
    with fake_mode:
        x = torch.empty(5)
    tracer = StepTracer("gpu")
    with fake_device_tracing(fake_mode, tracer):
        float((x * 2).sum())
        (x + 1).tolist()  # five reads of one copy: one sync
        bool((x > 0).all())
        int((x - 1).argmax())
        (x * 3).nonzero()
        x[x > 0]  # boolean indexing sizes its output from the values
        host = torch.zeros(3, dtype=torch.int64)  # no device: a host tensor, computed for real
        host += 1
        assert int(host[0]) == 1 and host.tolist() == [1, 1, 1]
    assert all("test_host_syncs.py" in r.where for r in tracer.host_reads)
    assert len(tracer.host_reads) == 10 and tracer.syncs == 6, [(r.op, r.where) for r in tracer.host_reads]
    assert {r.op for r in tracer.host_reads} >= {"aten._local_scalar_dense.default", "aten.nonzero.default",
                                                 "aten.index.Tensor"}
