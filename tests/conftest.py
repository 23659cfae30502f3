import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the network
torch.set_num_threads(min(2, torch.get_num_threads()))

SHARED = ROOT.parent / "shared"
QWEN_DIR = SHARED / "qwen2.5-0.5b-instruct"
LV_FILE = SHARED / "data" / "lotka_volterra_data.h5"

needs_qwen_files = pytest.mark.skipif(not (QWEN_DIR / "tokenizer.json").is_file(),
                                      reason="../shared/qwen2.5-0.5b-instruct not present (CI has it)")
needs_lv_file = pytest.mark.skipif(not LV_FILE.is_file(), reason="../shared/data/lotka_volterra_data.h5 not present (CI has it)")
