"""benchmarks/isa_mask.py: a command run under the AVX2 mask sees no AVX-512 in CPUID (torch's
dispatch, our kernels' path) nor in /proc/cpuinfo (what DeepSparse reads), and bad use gets one line.
Skipped where the CPU cannot make CPUID fault or has no AVX-512 to hide."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import isa_mask  # noqa: E402

CPUINFO = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""


@pytest.mark.skipif(not (isa_mask.cpuid_faulting() and " avx512f" in CPUINFO),
                    reason="needs CPUID faulting and an AVX-512 CPU to mask")
def test_masked_process_sees_avx2_only(tmp_path):
    env = isa_mask.masked_env("avx2", cache=tmp_path)
    probe = ("import torch; from sparse_runtime.kernels import native; "
             "flags = [l for l in open('/proc/cpuinfo') if l.startswith('flags')][0].split(); "
             "print(torch.backends.cpu.get_cpu_capability(), native.select_isa(), "
             "any(f.startswith(('avx512', 'amx')) for f in flags), 'avx2' in flags)")
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["AVX2", "avx2", "False", "True"]


def test_bad_use_is_one_line(capsys):
    assert isa_mask.main(["avx2"]) == 2
    assert "usage" in capsys.readouterr().err
    with pytest.raises(isa_mask.MaskError, match="unknown ISA mask"):
        isa_mask.masked_env("sse2")
