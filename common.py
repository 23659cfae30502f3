"""Small pieces every script shares: user-facing errors, durable writes, signals, device and dtype flags.

A research script should fail the way a good command-line tool does: one line that says what was
wrong and what to do, exit code 2, no traceback. Code deep inside the library raises `UserError`;
the scripts' `main` is wrapped in `run_cli`, which turns it into that one line.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch


class UserError(Exception):
    """Something the user can fix: a bad path, flag, file or network. The message says how."""


def run_cli(main) -> None:
    """Run `main()`, turning UserError (and Ctrl-C) into one line on stderr and exit code 2 / 130."""
    speaks = os.environ.get("RANK", "0") == "0"  # rank 0 speaks plainly; under torchrun the others name their rank
    try:
        main()
    except UserError as e:  # under torchrun each process says its own (it may be the only one to meet it)
        line = f"error: {e}\n" if speaks else f"error (rank {os.environ['RANK']}): {e}\n"
        sys.stderr.write(line)  # one write: lines of several processes sharing a pipe do not interleave
        sys.stderr.flush()
        sys.exit(2)
    except KeyboardInterrupt as e:
        if speaks and not isinstance(e, ReportedInterrupt):  # a reported one has had its line already
            print("interrupted", file=sys.stderr)
        sys.exit(130)


class ReportedInterrupt(KeyboardInterrupt):
    """Ctrl-C whose outcome was already reported ("interrupted after step N: checkpoint saved ..."):
    `run_cli` exits with 130 without adding a second, bare "interrupted"."""


def format_perplexity(ppl: float) -> str:
    """One format for perplexity everywhere (train.py's log, eval.py's table): 4 significant digits,
    so a random model's 2.4e+18 is not written out as nineteen digits and 3.987 stays readable."""
    return f"{ppl:.4g}"


def fsync(path: str | os.PathLike) -> None:
    """Push a file's bytes, or a folder's entries (a rename, a new file), to the disk.

    A rename survives a power cut only if the data it names and the folder holding it are synced too.
    Folders cannot be opened for syncing on Windows; there it is skipped.
    """
    if os.name != "posix" and os.path.isdir(path):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`.

    A reader (or a run resumed after a kill) sees the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it a normal file's mode
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def deferred_interrupts():
    """Hold back Ctrl-C (SIGINT) and SIGTERM inside the block and deliver them at its end.

    A few operations must happen whole or not at all: an optimizer update together with the step
    counter, data position and RNG state that say it happened. Inside this block a signal is only
    noted; leaving the block raises KeyboardInterrupt, so the caller sees the state before the block
    or after it, never in between. Outside the main thread signals cannot be caught; the block then
    runs as is.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:  # delivered once the block is complete (an error inside it propagates as is)
        raise KeyboardInterrupt


@contextmanager
def sigterm_as_interrupt():
    """Treat SIGTERM (what schedulers and `kill` send) like Ctrl-C inside the block, so a preempted
    run saves its checkpoint the same way an interrupted one does."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def read_json(path: str | os.PathLike, what: str = "file"):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path} is not valid JSON ({e})") from None


def reuse_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the OS (Linux only).

    A training step allocates and frees gigabytes of activations. By default glibc hands blocks over
    32 MB straight back to the OS, and the next step faults every page in again, which on virtual
    machines costs seconds per step. Keeping them makes later steps reuse warm memory at the price
    of fragmentation: freed blocks stay resident between live ones, ~1.5 GB at Qwen2.5-0.5B's
    4 x 512 step (README, Performance). Both limits go as high as mallopt's int allows: blocks up to
    2 GB come from the heap (a 4 x 512 step's full fp32 logits are 1.25 GB), and the top of the heap
    is never trimmed (-1), since a step that frees over 2 GB at once would otherwise hand all of it
    back and fault it in again next step. A user who set glibc's malloc tunables chose otherwise
    (for the leanest peak: `GLIBC_TUNABLES=glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=4194304`)
    and is left alone. Returns whether the setting took effect.
    """
    if sys.platform != "linux" or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]  # an int: a larger value would wrap silently
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        INT_MAX, NEVER = 2**31 - 1, -1  # mallopt(3): a trim threshold of -1 disables trimming
        return bool(libc.mallopt(M_MMAP_THRESHOLD, INT_MAX)) and bool(libc.mallopt(M_TRIM_THRESHOLD, NEVER))
    except (OSError, AttributeError):
        return False  # not glibc (musl, macOS): nothing to do


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def weights_dtype(name: str, device: torch.device, model=None, runs: list[dict] = ()) -> torch.dtype:
    """--dtype as the frozen weights' dtype. auto: bf16 on CUDA (train.py adds autocast), fp32 on MPS, and
    on the CPU whichever of the two runs `model`'s matmuls faster here, measured once per process
    (precision.py says how and why; a CPU without bf16 matmul units runs bf16 slower than fp32). With
    `runs` (training runs' config.json whose adapters go on this model), auto is what they trained on."""
    if name != "auto":
        return parse_dtype(name)
    import precision

    return precision.for_runs(name, device, model, list(runs))


def parse_device(name: str | None) -> torch.device:
    """`None`/"auto" picks CUDA, then Apple's MPS, then the CPU; asking for a device torch cannot see is
    a user error."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    if device.type == "mps" and not mps_available():
        raise UserError("--device mps was asked for but this torch has no MPS (Apple silicon) backend; use --device cpu")
    return device


def mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())
