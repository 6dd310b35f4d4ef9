"""``python -m ortho_lora_dist.cli``: what the launchers (torchrun, deepspeed, accelerate) start on every rank."""

import sys

from ortho_lora_dist.cli import main

sys.exit(main())
