"""Hand-rolled LoRA. Read layer.py (the adapter), inject.py (applying and merging), peft_format.py (files),
then the variants: dora.py (DoRA), init.py (PiSSA/OLoRA starts), loraplus.py (LoRA+ learning rates)."""

import sys

if sys.argv[:1] == ["-m"]:  # `python -m lora.…` is starting (argv[0] is "-m" until the module is found):
    from common.startup import quiet_ctrl_c  # Ctrl-C while torch loads is one line

    quiet_ctrl_c()

from .dora import DoRALinear
from .init import check_init
from .inject import (ALL_TARGETS, apply_lora, check_variants, lora_parameters, merge, merge_and_export,
                     parse_targets, unmerge)
from .layer import LoRALinear, lora_modules
from .loraplus import loraplus_lr_scales
from .peft_format import load_adapter, read_adapter, save_adapter

__all__ = ["ALL_TARGETS", "DoRALinear", "LoRALinear", "apply_lora", "check_init", "check_variants", "load_adapter", "lora_modules",
           "lora_parameters", "loraplus_lr_scales", "merge", "merge_and_export", "parse_targets", "read_adapter",
           "save_adapter", "unmerge"]
