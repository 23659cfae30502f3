"""FLOPs of the model from the layer shapes `model/` and `lora/` define, in two conventions.

    python flops.py --model Qwen/Qwen2.5-0.5B-Instruct --batch 4 --seq 512 --rank 8 --targets q_proj,v_proj
    python flops.py --check --model tiny        # our counts beside torch's FlopCounterMode and profiler

The numbers come from a ModelConfig (or a model object: its config, its LoRA settings and which of its
parameters train), never from a second copy of the architecture. Notation: N = B*T tokens, S the keys
each query attends over (T, or a KV cache's length: `Shapes.attended`), D hidden, H query heads, K
key/value heads, hd head dim, I intermediate, V vocabulary, r LoRA rank.

1. Coursework accounting (the one the 1e17 budget is stated in). add/subtract/negate/compare = 1,
   multiply/divide = 1, exp/log/sqrt/sin/cos = 10, indexing and copies free, and a matrix product
   (m x n)(n x p) costs m*p*(2n - 1). The non-matmul operations, broken into those primitives:
     RMSNorm (per vector of D)  square D + sum D-1 + mean 1 + eps 1 + sqrt 10 + reciprocal 1
                                + scale D + weight D                                  = 4D + 12
     RoPE                       angles T*hd/2 mults per row of the batch, cos and sin on (B, T, hd)
                                at 10 each (shared by all layers); per rotated element (q and k):
                                x*cos 1 + rotate-half negation 1/2 + x'*sin 1 + add 1  = 3.5
     attention scale            one multiply per score
     causal mask                a select: free
     softmax (per row of n)     max n-1 + subtract n + exp 10n + sum n-1 + divide n  = 14n - 2
     SiLU                       x / (1 + exp(-x)): negate 1 + exp 10 + add 1 + divide 1 = 13
     gating product, biases, residual adds, LoRA scaling and LoRA add: 1 per element
     cross-entropy (per token)  log-softmax over V: max V-1 + subtract V + exp 10V + sum V-1
                                + log 10, then pick and negate 1 = 13V + 9; mean over N: N
     AdamW (per trainable parameter, with clipping): 28 (moments 7, bias corrections 2,
                                sqrt 10, eps 1, divide 1, lr 1, update 1, weight decay 2, clip 3)
     DoRA (lora/dora.py), per adapted projection (out x in), per forward pass: B A (out x r)(r x in),
                                scale by s out*in, add W out*in, row norms: square out*in + sum
                                out*(in-1) + sqrt 10*out, m / norm out, minus 1 out; per token:
                                (scale-1)*base, scale*lora, *s, two adds = 5*out (plain LoRA's 2 are
                                in lora_B), + out for base(x) - bias where there is a bias
     DoRA with dropout, training only (`train_only`): base recomputed on dropout(x), one more
                                (N x in)(in x out) product, no bias subtraction
   backward = 2 x (forward + loss): the gradient flows back through the loss too. A training step
   = forward + loss + backward + optimizer. This convention counts the algorithm, not how memory is
   traded for time: activation checkpointing (`--grad-checkpoint`) adds no coursework FLOPs, so a
   budget buys the same training whichever memory setting runs it.
2. Hardware accounting (what profilers count): 2*M*N*K per matrix product, elementwise work excluded.
   The backward counts what autograd really computes: for y = x W^T, the input gradient (2*M*N*K)
   only where x requires grad, the weight gradient only where W trains (LoRA A and B; everything in
   full fine-tuning). So layer 0 of a LoRA model, whose input comes from a frozen embedding, skips
   most of its backward. Attention scores and probs @ V are counted over the full T x T square, as
   torch counts them: the causal mask saves no FLOPs here. With activation checkpointing the machine
   also recomputes each block's forward during the backward (`recompute`), up to the last tensor the
   backward needs: torch stops there (its default "early stop"), which skips the block's last matmul,
   down_proj (or, when down_proj has LoRA, its lora_B, the last one to run). DoRA adds its B A
   product per adapted projection and pass (computed without autograd: no backward), and in
   training with dropout the base product on dropout(x) (its input gradient where x requires grad).
   A PiSSA/OLoRA adapter is saved at rank 2r (lora/init.py): loaded for inference it counts as r = 2r.
"""

from __future__ import annotations

if __name__ == "__main__":  # before torch loads: Ctrl-C during start-up is one line (common/startup.py)
    from common.startup import quiet_ctrl_c
    quiet_ctrl_c()

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

from common.cli import UserError, run_cli

MATMUL_OPS = ("aten.mm", "aten.addmm", "aten.bmm")


def matmul_cw(m: int, n: int, p: int) -> int:
    """(m x n)(n x p) in the coursework convention."""
    return m * p * (2 * n - 1)


def softmax_cw(rows: int, n: int) -> int:
    return rows * (14 * n - 2)


def rmsnorm_cw(vectors: int, d: int) -> int:
    return vectors * (4 * d + 12)


@dataclass
class Op:
    name: str
    coursework: int = 0  # forward
    hardware: int = 0  # forward matmul FLOPs
    backward_hardware: int = 0  # what autograd computes for it
    category: str = "other"  # linear | attention | other


@dataclass
class Report:
    config: dict
    batch: int
    seq: int
    ops: dict[str, Op] = field(default_factory=dict)
    loss_coursework: int = 0
    optimizer_coursework: int = 0
    recompute_hardware: int = 0  # activation checkpointing: blocks' forward again, in the backward
    trainable_params: int = 0
    train_only_coursework: int = 0  # forward work only training does (DoRA's base product on dropout(x))
    train_only_hardware: int = 0  # its forward matmuls
    train_only_backward_hardware: int = 0

    def add(self, name, coursework=0, hardware=0, backward_hardware=0, category="other"):
        op = self.ops.setdefault(name, Op(name, category=category))
        op.coursework += coursework
        op.hardware += hardware
        op.backward_hardware += backward_hardware

    @property
    def forward_coursework(self) -> int:
        return sum(op.coursework for op in self.ops.values())

    @property
    def forward_hardware(self) -> int:
        return sum(op.hardware for op in self.ops.values())

    @property
    def backward_hardware(self) -> int:
        return sum(op.backward_hardware for op in self.ops.values())

    @property
    def backward_coursework(self) -> int:
        return 2 * (self.forward_coursework + self.train_only_coursework + self.loss_coursework)

    @property
    def train_step_coursework(self) -> int:
        return (self.forward_coursework + self.train_only_coursework + self.loss_coursework + self.backward_coursework
                + self.optimizer_coursework)

    @property
    def train_step_hardware(self) -> int:
        return (self.forward_hardware + self.backward_hardware + self.recompute_hardware + self.train_only_hardware
                + self.train_only_backward_hardware)

    @property
    def eval_coursework(self) -> int:
        """A validation batch: forward and loss, no backward."""
        return self.forward_coursework + self.loss_coursework

    def category(self, name: str, backward: bool = False) -> int:
        return sum(op.backward_hardware if backward else op.hardware for op in self.ops.values() if op.category == name)

    def to_json(self, budget: float | None = None) -> dict:
        tokens = self.batch * self.seq
        out = {
            "config": self.config, "batch": self.batch, "seq": self.seq,
            "forward": {"hardware": self.forward_hardware, "coursework": self.forward_coursework,
                        "by_op": {n: {"hardware": o.hardware, "coursework": o.coursework,
                                      "backward_hardware": o.backward_hardware} for n, o in self.ops.items()}},
            "loss": {"coursework": self.loss_coursework, "hardware": 0},
            "backward": {"hardware": self.backward_hardware, "coursework": self.backward_coursework},
            "recompute": {"hardware": self.recompute_hardware, "coursework": 0},
            "train_only": {"hardware": self.train_only_hardware, "backward_hardware": self.train_only_backward_hardware,
                           "coursework": self.train_only_coursework},
            "optimizer": {"coursework": self.optimizer_coursework, "hardware": 0},
            "train_step": {"hardware": self.train_step_hardware, "coursework": self.train_step_coursework},
            "eval_step": {"hardware": self.forward_hardware, "coursework": self.eval_coursework},
            "per_token": {"forward_hardware": self.forward_hardware / tokens,
                          "forward_coursework": self.forward_coursework / tokens,
                          "train_step_coursework": self.train_step_coursework / tokens},
            "trainable_params": self.trainable_params,
        }
        if budget is not None:
            out["budget"] = budget
            out["steps_in_budget"] = int(budget // self.train_step_coursework)
        return out


@dataclass(frozen=True)
class Shapes:
    """Everything the counts depend on: the configuration's sizes, the tokens, and what trains."""

    B: int  # batch
    T: int  # sequence length
    D: int  # hidden size
    H: int  # query heads
    K: int  # key/value heads
    hd: int  # head dim
    I: int  # intermediate size  # noqa: E741
    V: int  # vocabulary (embedding rows)
    L: int  # layers
    r: int  # LoRA rank (0: no LoRA)
    targets: frozenset  # adapted projections
    trainable: str  # "lora" | "full" | "none"
    qkv_bias: bool
    o_bias: bool
    keys: int = 0  # keys each query attends over (a KV cache's length); 0: the T new tokens themselves
    head_rows: int = 0  # rows that go through lm_head; 0: all N (generation needs only each row's last)
    head_vocab: int = 0  # lm_head outputs computed per row; 0: all V (constrained decoding computes fewer)
    dora: bool = False  # the adapters are DoRA's
    dropout: bool = False  # LoRA dropout is active (training with p > 0)

    @property
    def N(self) -> int:
        return self.B * self.T

    @property
    def attended(self) -> int:
        """Keys each query attends over: the cache's length, or the T new tokens themselves."""
        return self.keys or self.T

    @property
    def head_inputs(self) -> int:
        """Rows that go through lm_head: all N tokens, or only the rows whose next token is wanted."""
        return self.head_rows or self.N

    @property
    def head_outputs(self) -> int:
        """Logits lm_head computes per row: the whole vocabulary, or only the allowed tokens."""
        return self.head_vocab or self.V

    @property
    def projections(self) -> tuple[tuple[str, int, int, bool], ...]:
        """(name, d_in, d_out, bias) of the seven projections of a block, in the order they run."""
        D, I, q, kv = self.D, self.I, self.H * self.hd, self.K * self.hd
        return (("q_proj", D, q, self.qkv_bias), ("k_proj", D, kv, self.qkv_bias), ("v_proj", D, kv, self.qkv_bias),
                ("o_proj", q, D, self.o_bias), ("gate_proj", D, I, False), ("up_proj", D, I, False),
                ("down_proj", I, D, False))


def shapes_of(config, batch: int, seq: int, lora: dict | None, trainable: str | None, keys: int = 0,
              head_rows: int = 0, head_vocab: int = 0) -> Shapes:
    """`config` is a ModelConfig or a model (then its LoRA settings and trainable parameters are used)."""
    from lora.inject import parse_targets

    if hasattr(config, "config"):  # a model object
        model, config = config, config.config
        lora = lora or getattr(model, "lora_config", None)
        if trainable is None:
            trainable = "lora" if lora else "full" if all(p.requires_grad for p in model.parameters()) else "none"
    c = config
    return Shapes(B=batch, T=seq, D=c.hidden_size, H=c.num_attention_heads, K=c.num_key_value_heads, hd=c.head_dim,
                  I=c.intermediate_size, V=c.vocab_size, L=c.num_hidden_layers, r=lora["r"] if lora else 0,
                  targets=frozenset(parse_targets(lora["target_modules"])) if lora else frozenset(),
                  trainable=trainable or ("lora" if lora else "full"), qkv_bias=c.attention_bias, o_bias=c.o_proj_bias,
                  keys=keys, head_rows=head_rows, head_vocab=head_vocab, dora=bool(lora and lora.get("use_dora")),
                  dropout=bool(lora and lora.get("lora_dropout")) and (trainable or "lora") != "none")


def coursework_forward(s: Shapes) -> dict[str, int]:
    """One forward pass in the coursework convention, one line per row of the table at the top."""
    N, B, T, S, D, H, K, hd, I, r = s.N, s.B, s.T, s.attended, s.D, s.H, s.K, s.hd, s.I, s.r  # noqa: E741  (S: keys attended)
    adapted = [(d_in, d_out) for name, d_in, d_out, _ in s.projections if name in s.targets]
    per_layer = {
        **{name: matmul_cw(N, d_in, d_out) + (N * d_out if bias else 0) for name, d_in, d_out, bias in s.projections},
        "rope": int(3.5 * N * (H + K) * hd),  # rotating q and k
        "attention_scores": B * H * (matmul_cw(T, hd, S) + T * S),  # q k^T per head, then the 1/sqrt(hd) scale
        "softmax": softmax_cw(B * H * T, S),
        "attention_v": B * H * matmul_cw(T, S, hd),  # probs @ v per head
        "silu": 13 * N * I,
        "gating_product": N * I,
        "rmsnorm": 2 * rmsnorm_cw(N, D),  # before attention and before the MLP
        "residual_add": 2 * N * D,
        "lora_A": sum(matmul_cw(N, d_in, r) for d_in, _ in adapted),
        "lora_B": sum(matmul_cw(N, r, d_out) + 2 * N * d_out for _, d_out in adapted),  # + scale and add
        "dora": sum(dora_cw(N, d_in, d_out, r, bias) for name, d_in, d_out, bias in s.projections
                    if name in s.targets) if s.dora else 0,
    }
    ops = {name: s.L * flops for name, flops in per_layer.items()}
    ops["rope"] += B * T * hd // 2 + 2 * 10 * B * T * hd  # angles, cos and sin: once per forward
    ops["final_norm"] = rmsnorm_cw(N, D)
    ops["lm_head"] = matmul_cw(s.head_inputs, D, s.head_outputs)
    return ops


def dora_cw(N: int, d_in: int, d_out: int, r: int, bias: bool) -> int:
    """DoRA's own forward work on one projection, beyond plain LoRA's (the table at the top)."""
    norm = matmul_cw(d_out, r, d_in) + 2 * d_out * d_in + d_out * d_in + d_out * (d_in - 1) + 10 * d_out
    return norm + 2 * d_out + 3 * N * d_out + (N * d_out if bias else 0)


def dora_dropout_cw(s: Shapes) -> int:
    """Training with dropout: x W^T again on dropout(x), and no bias to subtract."""
    return s.L * sum(matmul_cw(s.N, d_in, d_out) - (s.N * d_out if bias else 0)
                     for name, d_in, d_out, bias in s.projections if name in s.targets) if s.dora and s.dropout else 0


def backward_matmuls(forward_flops: int, *operands_need_grad: bool) -> int:
    """A matmul's backward: C = A B gives dA = dC B^T and dB = A^T dC, each a product the size of the
    forward, computed only for an operand that needs a gradient (a trained weight, or an activation
    whose gradient flows on to something trained)."""
    return forward_flops * len([need for need in operands_need_grad if need])


def hardware_passes(s: Shapes) -> tuple[dict[str, int], dict[str, int]]:
    """(forward, backward) matmul FLOPs per operation, as autograd runs them.

    Each matmul costs 2*M*N*K forward and, backward, the same again per operand that needs a gradient
    (`backward_matmuls`). Whether an activation needs one is followed through the network: in a LoRA
    model the residual stream starts frozen and needs gradients from the first adapted projection on.
    """
    N, B, T, D, H, hd, r = s.N, s.B, s.T, s.D, s.H, s.hd, s.r
    fwd, bwd = dict.fromkeys(("lm_head", "lora_A", "lora_B", "attention_scores", "attention_v"), 0), {}
    full = s.trainable == "full"

    def add(name: str, forward: int, backward: int) -> None:
        fwd[name], bwd[name] = fwd.get(name, 0) + forward, bwd.get(name, 0) + backward

    def linear(name, d_in, d_out, x_grad: bool) -> bool:
        """One projection y = x W^T on N tokens (+ its LoRA); returns whether y needs a gradient."""
        flops = 2 * N * d_in * d_out
        add(name, flops, backward_matmuls(flops, x_grad, full))
        adapted = name in s.targets and s.trainable != "none"
        if name in s.targets:  # h = x A^T (A trains: weight grad; x's grad where x needs one), then h B^T
            a_flops, b_flops = 2 * N * d_in * r, 2 * N * r * d_out
            add("lora_A", a_flops, backward_matmuls(a_flops, adapted and x_grad, adapted))
            add("lora_B", b_flops, backward_matmuls(b_flops, adapted, adapted))
            if s.dora:  # B A for the norm, outside autograd; with dropout, dropout(x) W^T (its input grad only)
                add("dora", 2 * d_out * r * d_in, 0)
                if s.dropout:
                    add("dora_dropout", flops, backward_matmuls(flops, x_grad))
        return x_grad or full or adapted

    attn = 2 * B * H * T * s.attended * hd  # q k^T and probs @ v, each over the full T x S rectangle (S keys attended)
    grad = full  # does the residual stream entering layer 0 need a gradient?
    for _ in range(s.L):
        q, k, v = (linear(name, d_in, d_out, grad) for name, d_in, d_out, _ in s.projections[:3])
        add("attention_scores", attn, backward_matmuls(attn, q, k))  # scores = q k^T
        add("attention_v", attn, backward_matmuls(attn, q or k, v))  # out = probs v; probs need a grad if q or k do
        grad = linear("o_proj", H * hd, D, q or k or v) or grad
        gate, up = (linear(name, d_in, d_out, grad) for name, d_in, d_out, _ in s.projections[4:6])
        grad = linear("down_proj", s.I, D, gate or up) or grad
    head = 2 * s.head_inputs * D * s.head_outputs
    add("lm_head", head, backward_matmuls(head, grad, full))  # logits = h W^T
    return fwd, bwd


def recompute_hardware(s: Shapes, forward: dict[str, int]) -> int:
    """Activation checkpointing recomputes each block's forward in the backward, up to the last tensor
    the backward needs: torch stops there (early stop), skipping the block's last matmul."""
    blocks = sum(forward.values()) - forward["lm_head"]  # dora_dropout included: it is a block's forward too
    last = 2 * s.N * s.r * s.D if "down_proj" in s.targets else 2 * s.N * s.I * s.D
    if s.dora and "down_proj" in s.targets:  # DoRA's m gradient needs lora_B's output: nothing is skipped
        last = 0
    return blocks - s.L * last if s.trainable != "none" else 0


OP_ORDER = ("q_proj", "k_proj", "v_proj", "rope", "attention_scores", "softmax", "attention_v", "o_proj", "gate_proj",
            "up_proj", "silu", "gating_product", "down_proj", "rmsnorm", "residual_add", "final_norm", "lm_head",
            "lora_A", "lora_B", "dora")
CATEGORY = {"attention_scores": "attention", "attention_v": "attention", "lm_head": "linear", "lora_A": "linear",
            "lora_B": "linear", "dora": "linear", **{name: "linear" for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj")}}


def count(config, batch: int, seq: int, lora: dict | None = None, trainable: str | None = None,
          recompute: bool = False, keys: int = 0, head_rows: int = 0, head_vocab: int = 0) -> Report:
    """FLOPs of one forward pass (and its backward) at batch x seq tokens, in both conventions.

    `config` is a ModelConfig or a model (then its LoRA settings and trainable parameters are used).
    `lora` is {"r": rank, "target_modules": [...]} (optionally "use_dora", and "lora_dropout", which
    matters to DoRA in training: `train_only`); `trainable` is "lora" (base frozen, the default
    with LoRA), "full" (every parameter trains, the default without) or "none" (inference only).
    `recompute`: activation checkpointing per block, as `model.grad_checkpoint` does it. `keys` and
    `head_rows`, `head_vocab` describe a pass with a KV cache (see `generation`).
    """
    model_config = config.config if hasattr(config, "config") else config
    s = shapes_of(config, batch, seq, lora, trainable, keys, head_rows, head_vocab)
    cw, (fwd, bwd) = coursework_forward(s), hardware_passes(s)
    rep = Report(config=model_config.to_dict(), batch=batch, seq=seq)
    for name in OP_ORDER:
        if (s.targets or not name.startswith("lora_")) and (s.dora or name != "dora"):
            rep.add(name, cw[name], fwd.get(name, 0), bwd.get(name, 0), CATEGORY.get(name, "other"))
    rep.train_only_coursework = dora_dropout_cw(s)
    rep.train_only_hardware, rep.train_only_backward_hardware = fwd.get("dora_dropout", 0), bwd.get("dora_dropout", 0)
    rep.loss_coursework = s.N * (13 * s.V + 9) + s.N  # log-softmax and pick per token, then the mean
    if s.trainable == "lora":
        rep.trainable_params = s.L * sum(s.r * (d_in + d_out) + (d_out if s.dora else 0)  # DoRA: m, (out,)
                                         for name, d_in, d_out, _ in s.projections if name in s.targets)
    elif s.trainable == "full":
        rep.trainable_params = parameter_count(model_config)
    rep.optimizer_coursework = 28 * rep.trainable_params
    if recompute:
        rep.recompute_hardware = recompute_hardware(s, fwd)
    return rep


def generation(config, batch: int, prompt_len: int, decode_steps: int, lora: dict | None = None,
               samples: int = 1, head_vocab: int = 0) -> dict:
    """FLOPs of `model.generate` on a batch: a prefill of `batch` (left-padded) prompts, then
    `decode_steps` forward passes of one token for each of the batch x `samples` rows over the growing
    KV cache (every sample continues its prompt's cache; the prompt is not recomputed). Each pass sends
    only the last position of every row through lm_head, and only its `head_vocab` allowed rows when
    decoding is constrained (0: the whole vocabulary). Padding positions cost as much as text (they are
    computed), and the sampling itself (a softmax per new token) is not counted.
    The arguments are generate()'s `stats`. Returns {"coursework", "hardware"} for the whole generation."""
    rows = batch * samples
    passes = [count(config, batch, prompt_len, lora, trainable="none", head_rows=batch, head_vocab=head_vocab)]
    passes += [count(config, rows, 1, lora, trainable="none", keys=prompt_len + i + 1, head_rows=rows,
                     head_vocab=head_vocab) for i in range(decode_steps)]
    return {"coursework": sum(p.forward_coursework for p in passes), "hardware": sum(p.forward_hardware for p in passes)}


def parameter_count(c) -> int:
    """Parameters of the base model, from the same shapes (tied embeddings counted once)."""
    attn = c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size
    attn += (c.q_size + 2 * c.kv_size if c.attention_bias else 0) + (c.hidden_size if c.o_proj_bias else 0)
    mlp = 3 * c.hidden_size * c.intermediate_size
    per_layer = attn + mlp + 2 * c.hidden_size
    emb = c.vocab_size * c.hidden_size
    return c.num_hidden_layers * per_layer + emb * (1 if c.tie_word_embeddings else 2) + c.hidden_size


# --------------------------------------------------------------------------------------- the check
def measure(model, input_ids, backward: bool) -> dict:
    """Matmul FLOPs by torch.utils.flop_counter.FlopCounterMode (forward, or forward + backward) and,
    for the forward, by torch.profiler (which records no backward FLOPs)."""
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    def run():
        logits = model(input_ids)
        if backward:
            F.cross_entropy(logits.flatten(0, 1).float(), input_ids.flatten()).backward()

    with FlopCounterMode(display=False) as counter:
        run()
    by_op = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    out = {"counter": {"linear": by_op.get("aten.mm", 0) + by_op.get("aten.addmm", 0),
                       "attention": by_op.get("aten.bmm", 0), "total": counter.get_total_flops()}}
    if not backward:
        with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
            with torch.no_grad():
                model(input_ids)
        ev = {e.key: e.flops for e in prof.key_averages() if e.flops}
        out["profiler"] = {"linear": ev.get("aten::mm", 0) + ev.get("aten::addmm", 0),
                           "attention": ev.get("aten::bmm", 0)}
        out["profiler"]["total"] = out["profiler"]["linear"] + out["profiler"]["attention"]
    return out


def check(model, batch: int, seq: int, seed: int = 0, recompute: bool = False) -> list[dict]:
    """Our hardware counts beside the counters', per category, forward and forward + backward.

    With `recompute`, the model runs with activation checkpointing; the recomputed forward shows
    in the forward+backward total (torch cannot tell which category a recomputed matmul serves).
    """
    import torch

    model.set_attention("matmul")  # CPU SDPA is invisible to both counters
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    rep = count(model, batch, seq, recompute=recompute)
    was_training, model.grad_checkpoint = model.training, recompute
    model.train(recompute or was_training)  # checkpointing applies in training mode only
    fwd, fb = measure(model, ids, backward=False), measure(model, ids, backward=True)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    rows = []
    for cat in ("linear", "attention", "total"):
        ours_f = rep.forward_hardware if cat == "total" else rep.category(cat)
        ours_b = rep.backward_hardware if cat == "total" else rep.category(cat, backward=True)
        if cat == "total":
            ours_b += rep.recompute_hardware
        rows.append({"category": cat, "pass": "forward", "ours": ours_f, "flop_counter": fwd["counter"][cat],
                     "profiler": fwd["profiler"][cat]})
        if cat == "total" or not recompute:
            rows.append({"category": cat, "pass": "forward+backward", "ours": ours_f + ours_b,
                         "flop_counter": fb["counter"][cat], "profiler": None})
    return rows


# -------------------------------------------------------------------------------------------- CLI
def fmt(x: float) -> str:
    return f"{x:.3e}"


def print_table(rep: Report, budget: float, steps: int | None) -> None:
    tokens = rep.batch * rep.seq
    print(f"FLOPs for one forward pass, batch {rep.batch} x seq {rep.seq} ({tokens:,} tokens)")
    print(f"{'operation':<18}{'coursework':>14}{'hardware':>14}{'hw backward':>14}{'share (cw)':>12}")
    total = rep.forward_coursework
    for op in rep.ops.values():
        print(f"{op.name:<18}{fmt(op.coursework):>14}{fmt(op.hardware):>14}{fmt(op.backward_hardware):>14}"
              f"{100 * op.coursework / total:>11.2f}%")
    print("-" * 72)
    print(f"{'forward':<18}{fmt(rep.forward_coursework):>14}{fmt(rep.forward_hardware):>14}")
    print(f"{'loss':<18}{fmt(rep.loss_coursework):>14}{fmt(0):>14}")
    print(f"{'backward':<18}{fmt(rep.backward_coursework):>14}{fmt(rep.backward_hardware):>14}")
    if rep.recompute_hardware:
        print(f"{'recompute':<18}{fmt(0):>14}{fmt(rep.recompute_hardware):>14}")
    print(f"{'optimizer':<18}{fmt(rep.optimizer_coursework):>14}{fmt(0):>14}")
    print(f"{'training step':<18}{fmt(rep.train_step_coursework):>14}{fmt(rep.train_step_hardware):>14}")
    print(f"per token: forward {fmt(rep.forward_coursework / tokens)} (coursework), {fmt(rep.forward_hardware / tokens)} "
          f"(hardware); training step {fmt(rep.train_step_coursework / tokens)} (coursework)")
    print(f"trainable parameters: {rep.trainable_params:,}")
    n = int(budget // rep.train_step_coursework)
    print(f"budget {budget:.3g} FLOPs (coursework accounting): {n:,} training steps fit")
    if steps is not None:
        used = steps * rep.train_step_coursework
        print(f"{steps:,} steps cost {fmt(used)} FLOPs = {100 * used / budget:.2f}% of the budget")


def sum_runs(folder: Path) -> list[dict]:
    """Per-experiment totals: the final FLOP counters of every run (a folder with metrics.jsonl)."""
    rows = []
    for metrics in sorted(folder.glob("**/metrics.jsonl")):
        last = {}
        for line in metrics.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "flops" in rec:
                last = rec
        if last:
            rows.append({"run": str(metrics.parent.relative_to(folder)) or ".", "steps": last.get("step", 0),
                         "flops": last["flops"], "flops_hardware": last.get("flops_hardware")})
    return rows


def print_runs(folder: Path, as_json: bool) -> None:
    rows = sum_runs(folder)
    if not rows:
        raise UserError(f"no runs with metrics.jsonl under {folder}")
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'run':<40}{'steps':>8}{'FLOPs (coursework)':>22}{'FLOPs (hardware)':>20}")
    for r in rows:
        print(f"{r['run']:<40}{r['steps']:>8}{fmt(r['flops']):>22}{fmt(r['flops_hardware'] or 0):>20}")
    print(f"{'total':<40}{'':>8}{fmt(sum(r['flops'] for r in rows)):>22}"
          f"{fmt(sum(r['flops_hardware'] or 0 for r in rows)):>20}")


def print_check(args) -> None:
    import lora as lora_lib
    from model import load_model

    model = load_model(args.model)
    if args.rank:
        lora_lib.apply_lora(model, rank=args.rank, targets=args.targets)
    rows = check(model, args.batch, args.seq, recompute=args.grad_checkpoint)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"hardware FLOPs, ours vs torch, batch {args.batch} x seq {args.seq} (matmul attention path)")
    print(f"{'category':<11}{'pass':<18}{'ours':>14}{'FlopCounterMode':>17}{'diff':>8}{'profiler':>14}{'diff':>8}")
    for r in rows:
        prof = fmt(r["profiler"]) if r["profiler"] is not None else "n/a"
        pdiff = f"{r['profiler'] - r['ours']:+d}" if r["profiler"] is not None else "—"
        print(f"{r['category']:<11}{r['pass']:<18}{fmt(r['ours']):>14}{fmt(r['flop_counter']):>17}"
              f"{r['flop_counter'] - r['ours']:>+8d}{prof:>14}{pdiff:>8}")
    print("(the profiler records no backward FLOPs; neither counter sees fused CPU SDPA)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct", help="hub id, checkpoint folder or 'tiny' (config only)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (0: no LoRA, full fine-tuning)")
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--steps", type=int, default=None, help="also report the cost of this many training steps")
    p.add_argument("--budget", type=float, default=1e17)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--check", action="store_true", help="run the real model under torch's FLOP counters")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="activation checkpointing, as train.py --grad-checkpoint: count the recomputed forward")
    p.add_argument("--runs", default=None, help="sum the FLOPs of every training run under this folder")
    args = p.parse_args(argv)
    if args.batch < 1 or args.seq < 1:
        raise UserError("--batch and --seq must be at least 1")
    if args.rank < 0:
        raise UserError("--rank must be >= 0 (0 means no LoRA)")
    if args.runs:
        return print_runs(Path(args.runs), args.json)
    lora_cfg = {"r": args.rank, "target_modules": args.targets} if args.rank else None
    if args.check:
        return print_check(args)
    from model import load_config

    rep = count(load_config(args.model), args.batch, args.seq, lora=lora_cfg, recompute=args.grad_checkpoint)
    if args.json:
        print(json.dumps(rep.to_json(args.budget) | ({"steps": args.steps, "steps_flops": args.steps * rep.train_step_coursework} if args.steps else {})))
    else:
        print_table(rep, args.budget, args.steps)


if __name__ == "__main__":
    run_cli(main)
