"""What the test files share: the import path, thread settings, runners for the command lines, and
two stand-in tokenizers. Tests marked `subprocess` start fresh Python processes or torchrun worlds
(seconds each): `pytest -m "not subprocess"` leaves them out for a quick run."""
import os
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

# tests import the flat modules at the repository root, as a reader would
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(min(2, os.cpu_count() or 1))
# child processes (python train.py, torchrun) share the machine's 2 cores: one thread each
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

from common import cli  # noqa: E402  (needs the path above)


def pytest_configure(config):
    config.addinivalue_line("markers", "subprocess: starts fresh processes (python, torchrun)")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread: its hand-offs cost more than it saves, and
    much more when the other core is busy. Modules opt in with pytestmark."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_cli(main, argv, capsys):
    """main(argv) as its command line runs it (through common.cli): (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        cli(lambda: main(list(map(str, argv))))
        raise SystemExit(0)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


class PatchColours(torch.nn.Module):
    """A fixed stand-in tokenizer for the trainer's tests: each 4x4 patch -> its mean colour
    quantised to 4 levels per channel (64 codes). Codes of the built-in dataset that mean
    something, made fast."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(codebook_size=64)

    def encode(self, images):
        q = ((F.avg_pool2d(images, 4) + 1) / 2 * 3.999).floor().long().clamp(0, 3)
        return q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2]


class Interrupted(Exception):
    """What HashTokenizer raises to stand for a killed process."""


class HashTokenizer(torch.nn.Module):
    """A stand-in with VQModel's interface (encode, config.codebook_size, weights): each 4x4
    patch's mean colour hashed over the whole codebook, so codes above 32767 exercise the uint16
    round trip. Counts the images it encodes, to see what a resumed extraction recomputes."""

    def __init__(self, codebook_size=65536, salt=0.0, interrupt_after=None):
        super().__init__()
        self.config = SimpleNamespace(codebook_size=codebook_size)
        self.mix = torch.nn.Parameter(torch.tensor([7919.0, 104729.0, 31.0 + salt]),
                                      requires_grad=False)
        self.encoded, self.interrupt_after = 0, interrupt_after

    def encode(self, images):
        if self.interrupt_after is not None and self.encoded >= self.interrupt_after:
            raise Interrupted  # as a killed process would stop: between two batches
        self.encoded += len(images)
        q = ((F.avg_pool2d(images, 4) + 1) * 127.5).round().long()
        return (q * self.mix.long()[None, :, None, None]).sum(1) % self.config.codebook_size
