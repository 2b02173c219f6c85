"""Device cards: what the cost model knows about a machine, and the efficiencies it assumes.

A card prices one op as

    time = max(FLOPs / (e_c * peak[dtype]), bytes / (e_m * bandwidth)) + launches * launch

(attention kernels use `e_attn` instead of `e_c`), and a ring all-reduce of B bytes over p
ranks as 2 (p - 1) / p * B / (e_net * link) + 2 (p - 1) * net_latency.

The GPU numbers are the vendors' datasheet figures (dense, i.e. without 2:4 sparsity):
- H100 SXM5 80 GB (NVIDIA H100 Tensor Core GPU datasheet): BF16/FP16 989.4 TFLOP/s, TF32
  494.7, FP32 66.9; HBM3 3.35 TB/s; NVLink 4 900 GB/s per GPU (450 GB/s each way); 132 SMs.
- H200 SXM 141 GB (NVIDIA H200 datasheet): the H100's compute; HBM3e 4.8 TB/s; NVLink 900 GB/s.
- A100 SXM4 80 GB (NVIDIA A100 datasheet): BF16/FP16 312 TFLOP/s, TF32 156, FP32 19.5;
  HBM2e 2.039 TB/s; NVLink 3 600 GB/s per GPU (300 GB/s each way); 108 SMs.
This project has measured none of them yet (no GPU has been lent), so the efficiencies are
assumptions, stated here and overridable (`matta cost --e-c ...`):
- e_c = 0.70: large bf16 GEMMs (cuBLAS, or matta's nested kernel) at 65-75% of peak on
  Hopper is what well-shaped GEMMs of these sizes usually reach;
- e_attn = 0.40: PyTorch's SDPA runs FlashAttention-2 kernels, which reach ~35-45% of a
  Hopper's peak (FlashAttention-3's Hopper kernels reach more; PyTorch does not ship them);
- e_m = 0.80: streaming kernels reach ~80-90% of HBM bandwidth;
- launch = 4 us per kernel: the GPU-side gap and start-up of a small eager kernel, which is
  what a step pays when the host keeps ahead (kernels shorter than this cost about this);
- e_net = 0.80 of the one-way NVLink bandwidth for NCCL's ring all-reduce, and 10 us per
  ring step;
- sync = 20 us per host sync: the round trip, and the device idling while the host queues
  the next kernels (a low estimate: a step with many small kernels after a sync pays more).
A CPU card comes from `benchmarks/calibrate_cost.py`, which measures its GEMM FLOP/s (and how
they fall for thin products, `gemm_curve`), copy bandwidth, element-wise rate and per-op
overhead here; its efficiencies are 1 (the peaks are measured rates).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

# Keys of `DeviceCard.peak_flops`: the dtype a matrix product runs in.
PEAK_KEYS = ("bf16", "fp16", "tf32", "fp32", "fp64")


@dataclass(frozen=True)
class DeviceCard:
    """One device as the cost model sees it (see the module docstring)."""

    name: str
    kind: str  # "gpu" (kernels; multi-tensor ops batch many tensors per launch) or "cpu" (ops one by one)
    peak_flops: dict = field(default_factory=dict)  # PEAK_KEYS -> FLOP/s of matrix products
    vector_flops: float = 0.0  # FLOP/s of element-wise work (non-matrix ops)
    bandwidth: float = 0.0  # bytes/s of the device memory
    launch: float = 0.0  # seconds per kernel launch (GPU) or per dispatched op (CPU)
    memory: float = 0.0  # bytes of device memory
    sm_count: int = 0  # streaming multiprocessors (nested-linear split-K choice)
    link: float = 0.0  # one-way bytes/s per GPU over NVLink (0: no interconnect)
    net_latency: float = 0.0  # seconds per ring step of an all-reduce
    sync: float = 0.0  # seconds a host sync costs a step (the device queue drains, then refills)
    # [(smallest GEMM dimension, share of the peak)], rising: small products run below the
    # peak; between points interpolated in log(dimension), outside them the end values.
    # Empty: every GEMM at the peak (the GPU cards: nothing measured there yet).
    gemm_curve: list = field(default_factory=list)
    e_c: float = 1.0
    e_attn: float = 1.0
    e_m: float = 1.0
    e_net: float = 1.0
    source: str = ""  # where the numbers come from

    def with_efficiencies(self, **values) -> "DeviceCard":
        """This card with some of e_c, e_attn, e_m, e_net, launch, sync replaced (None keeps one)."""
        given = {k: v for k, v in values.items() if v is not None}
        for key, value in given.items():
            if key not in ("e_c", "e_attn", "e_m", "e_net", "launch", "sync"):
                raise ValueError(f"unknown card setting {key!r}")
            bad = value < 0 if key in ("launch", "sync") else not value > 0
            if bad:
                raise ValueError(f"card setting {key} must be {'>= 0' if key in ('launch', 'sync') else '> 0'}, got {value!r}")
        return dataclasses.replace(self, **given)

    def gemm_share(self, min_dim: int) -> float:
        """The share of the peak a GEMM whose smallest dimension is `min_dim` reaches (`gemm_curve`)."""
        curve = self.gemm_curve
        if not curve or min_dim <= 0:
            return 1.0
        if min_dim <= curve[0][0]:
            return curve[0][1]
        for (d0, s0), (d1, s1) in zip(curve, curve[1:]):
            if min_dim <= d1:
                t = (math.log(min_dim) - math.log(d0)) / (math.log(d1) - math.log(d0))
                return s0 + t * (s1 - s0)
        return curve[-1][1]

    def matmul_peak(self, key: str) -> float:
        if key not in self.peak_flops:
            raise ValueError(f"card {self.name} has no {key} peak; it knows {', '.join(self.peak_flops)}")
        return self.peak_flops[key]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


_TERA = 1e12
_NV = "vendor datasheet (dense); efficiencies assumed, not measured (see matta/costmodel/cards.py)"
_GPU_EFFICIENCIES = dict(e_c=0.70, e_attn=0.40, e_m=0.80, e_net=0.80, launch=4e-6, net_latency=10e-6, sync=20e-6)

CARDS = {
    "h100": DeviceCard(
        name="H100 SXM5 80GB", kind="gpu",
        peak_flops={"bf16": 989.4 * _TERA, "fp16": 989.4 * _TERA, "tf32": 494.7 * _TERA, "fp32": 66.9 * _TERA,
                    "fp64": 66.9 * _TERA},
        vector_flops=66.9 * _TERA, bandwidth=3.35e12, memory=80e9, sm_count=132, link=450e9, source=_NV,
        **_GPU_EFFICIENCIES),
    "h200": DeviceCard(
        name="H200 SXM 141GB", kind="gpu",
        peak_flops={"bf16": 989.4 * _TERA, "fp16": 989.4 * _TERA, "tf32": 494.7 * _TERA, "fp32": 66.9 * _TERA,
                    "fp64": 66.9 * _TERA},
        vector_flops=66.9 * _TERA, bandwidth=4.8e12, memory=141e9, sm_count=132, link=450e9, source=_NV,
        **_GPU_EFFICIENCIES),
    "a100": DeviceCard(
        name="A100 SXM4 80GB", kind="gpu",
        peak_flops={"bf16": 312 * _TERA, "fp16": 312 * _TERA, "tf32": 156 * _TERA, "fp32": 19.5 * _TERA,
                    "fp64": 19.5 * _TERA},
        vector_flops=19.5 * _TERA, bandwidth=2.039e12, memory=80e9, sm_count=108, link=300e9, source=_NV,
        **_GPU_EFFICIENCIES),
}


def load_card(name_or_path: str) -> DeviceCard:
    """A card by name (h100, h200, a100; auto: the CUDA GPU this process sees) or from a JSON
    file (e.g. one benchmarks/calibrate_cost.py wrote)."""
    key = str(name_or_path).strip().lower()
    if key in CARDS:
        return CARDS[key]
    if key == "auto":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--card auto names the CUDA GPU this process sees, and there is none; "
                             f"use one of {', '.join(CARDS)} or a card JSON file")
        return card_for_cuda_device(torch.cuda.get_device_name())
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"unknown card {name_or_path!r}: use one of {', '.join(CARDS)} or a card JSON file "
                         "(benchmarks/calibrate_cost.py writes one for this CPU)")
    try:
        values = json.loads(path.read_text())
        card = DeviceCard(**values)
        card = dataclasses.replace(card, gemm_curve=[(int(d), float(v)) for d, v in card.gemm_curve])
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise ValueError(f"card file {path} is not a DeviceCard JSON ({exc})") from None
    if card.kind not in ("gpu", "cpu"):
        raise ValueError(f"card file {path}: kind must be 'gpu' or 'cpu', got {card.kind!r}")
    return card


def card_for_cuda_device(device_name: str) -> DeviceCard:
    """The card of a CUDA device by its name (torch.cuda.get_device_name), for gpu_check.sh."""
    name = device_name.upper()
    for key in ("H200", "H100", "A100"):
        if key in name:
            return CARDS[key.lower()]
    raise ValueError(f"no card for CUDA device {device_name!r}; pass --card h100|h200|a100 or a card JSON")
