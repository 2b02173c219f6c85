"""Losses: the MatTA composite loss (Student, TA and distillation terms with ramp-up)."""
from ..ops import MatTALossOutput, check_loss_inputs, fused_linear_matta_loss
from .matta_loss import RAMP_SCHEDULES, MatTALoss, ramp_value

__all__ = ["MatTALoss", "MatTALossOutput", "RAMP_SCHEDULES", "check_loss_inputs", "fused_linear_matta_loss",
           "ramp_value"]
