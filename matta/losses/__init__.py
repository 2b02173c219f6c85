"""Losses: the MatTA composite loss (Student, TA and distillation terms with ramp-up)."""
from ..ops import MatTALossOutput, fused_linear_matta_loss
from .matta_loss import RAMP_SCHEDULES, MatTALoss, ramp_value

__all__ = ["MatTALoss", "MatTALossOutput", "RAMP_SCHEDULES", "fused_linear_matta_loss", "ramp_value"]
