"""Loading reads each tensor into its final storage: no second copy of the weights in memory."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from model import ModelConfig, Transformer, save_pretrained

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS from /proc (Linux)")
@pytest.mark.parametrize("dtype", ["bfloat16"])  # the stored dtype: read straight into the parameters
def test_peak_rss_while_loading_stays_near_model_size(tmp_path, dtype):
    # Qwen2.5-0.5B's widths with fewer layers and a smaller vocabulary: ~90M parameters.
    cfg = ModelConfig(vocab_size=32000, num_hidden_layers=4)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu").to(getattr(torch, dtype))
    model.tie_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.01)
    save_pretrained(model, tmp_path / "ck")
    size = (tmp_path / "ck" / "model.safetensors").stat().st_size
    del model
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from model import Transformer, load_model
        from model.tiny import tiny_config
        def status(key):
            return int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1]) * 1024
        with torch.device('meta'):  # the first meta-device build imports ~70 MB of torch machinery:
            Transformer(tiny_config())  # a fixed cost, not a copy of weights, so it goes into the baseline
        base = status('VmRSS')
        m = load_model({str(tmp_path / 'ck')!r}, dtype=torch.{dtype})
        print(status('VmHWM') - base)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    grown = int(out.stdout.strip().splitlines()[-1])
    assert grown <= 1.3 * size, f"peak RSS grew by {grown / size:.2f}x the checkpoint size"
