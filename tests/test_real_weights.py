"""A real pretrained checkpoint (SmolLM2-135M-Instruct, Llama family), when .ci/run could build it: our
model gives transformers' logits and greedy tokens. The chat template tests (tests/test_chat.py) use it too."""

import pytest
import torch

from tests.test_chat import SMOL_DIR

pytestmark = pytest.mark.skipif(not (SMOL_DIR / "model.safetensors").is_file() or not (SMOL_DIR / "config.json").is_file(),
                                reason=f"SmolLM2 not built in {SMOL_DIR} (.ci/run builds it from PyPI into $SMOLLM2_DIR; "
                                       f"no network, no model)")
TEXT = "The Lotka-Volterra equations describe predators and prey:"


@pytest.fixture(scope="module")
def pair():
    import transformers

    from model import load_pretrained

    ours, tok = load_pretrained(str(SMOL_DIR), dtype=torch.float32, device=torch.device("cpu"))
    ref = transformers.AutoModelForCausalLM.from_pretrained(SMOL_DIR, torch_dtype=torch.float32).eval()
    return ours.eval(), ref, tok


def test_smollm2_logits_equal_transformers(pair):
    ours, ref, tok = pair
    ids = torch.tensor([tok.encode(TEXT)])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=2e-4, rtol=1e-4)


def test_smollm2_greedy_tokens_equal_transformers(pair):
    from model import generate

    ours, ref, tok = pair
    prompt = tok.encode(tok.chat_prompt([{"role": "user", "content": "What is 2+2?"}]))
    (new,) = generate(ours, [prompt], 12)
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                              pad_token_id=tok.pad_id)[0, len(prompt):].tolist()
    assert new == theirs
