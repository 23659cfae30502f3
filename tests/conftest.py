import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the network
# --dtype auto on the CPU measures bf16 against fp32 (model/precision.py); the suite pins it to fp32 so that its
# numbers do not depend on the machine. tests/test_precision.py unsets it and mocks the measurement.
os.environ["QWEN_LORA_CPU_DTYPE"] = "float32"


def _import_bitsandbytes_eagerly() -> None:
    """bitsandbytes (test-only: the NF4 oracle; peft imports it too) wraps its CPU kernels in torch.compile
    when first imported. Import it once with TORCHDYNAMO_DISABLE=1 so they run eagerly (no compilation per
    shape), then restore the variable, so the --compile tests still compile."""
    previous = os.environ.get("TORCHDYNAMO_DISABLE")
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass
    finally:
        if previous is None:
            del os.environ["TORCHDYNAMO_DISABLE"]
        else:
            os.environ["TORCHDYNAMO_DISABLE"] = previous


_import_bitsandbytes_eagerly()
torch.set_num_threads(min(2, torch.get_num_threads()))

# Files some tests need and the repository does not ship: Qwen2.5-0.5B-Instruct's tokenizer and config (no
# weights) and the coursework's data file. QWEN_LORA_TEST_FILES names the folder holding them (default: a
# "shared" folder beside the repository, where CI keeps them); without them those tests are skipped.
SHARED = Path(os.environ.get("QWEN_LORA_TEST_FILES", ROOT.parent / "shared"))
QWEN_DIR = SHARED / "qwen2.5-0.5b-instruct"
LV_FILE = SHARED / "data" / "lotka_volterra_data.h5"

needs_qwen_files = pytest.mark.skipif(not (QWEN_DIR / "tokenizer.json").is_file(),
                                      reason=f"{QWEN_DIR} holds no Qwen2.5 tokenizer (set QWEN_LORA_TEST_FILES; README)")
needs_lv_file = pytest.mark.skipif(not LV_FILE.is_file(), reason=f"{LV_FILE} not present (set QWEN_LORA_TEST_FILES; README)")
