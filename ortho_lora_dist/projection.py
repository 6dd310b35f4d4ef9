"""Public alias of :mod:`ortho_lora_dist.core.projection` (``from ortho_lora_dist.projection import project``)."""

from ortho_lora_dist.core.gram import gram
from ortho_lora_dist.core.projection import (
    check_order,
    combine_weights,
    joint_weights,
    project,
    projection_coefficients,
)

__all__ = ["check_order", "combine_weights", "gram", "joint_weights", "project", "projection_coefficients"]
