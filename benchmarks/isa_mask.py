"""Run a command as if this CPU had AVX2 but no AVX-512, AVX-VNNI or AMX: every engine, DeepSparse too.

    python benchmarks/isa_mask.py avx2 -- python benchmarks/bench_quant_latency.py --name quant_latency_avx2_emulated

Why: the AVX2 machines this project meets (AMD EPYC) are not always lent, and the engines' own switches
do not restrict them all. DeepSparse 1.8 with ``NM_ARCH=avx2`` loads its "avx2" binary, which still
reads the CPU's flags and JITs AVX-512 (zmm) kernels on an AVX-512 machine (seen with gdb:
docs/protocols.md#emulating-avx2). This wrapper builds ``isa_mask/cpuid_mask.c`` (a preloaded library
that makes CPUID fault and answers it without the masked bits, and serves /proc/cpuinfo without their
flags) into the cache, then runs the command with it preloaded, glibc's AVX-512 string functions off,
and the engines' switches set as well. Children inherit all of it (LD_PRELOAD re-applies the mask after
each exec). The memory system, caches and clocks stay this machine's, so timings are an emulation of
an AVX2 core with this machine's memory, not an AMD machine's figures: tables say so (the
``SPARSE_RUNTIME_ISA_MASK`` variable tells the benchmarks).

Needs Linux on a CPU with CPUID faulting (the ``cpuid_fault`` flag; Intel since Ivy Bridge, also
under KVM) and a C compiler.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "isa_mask" / "cpuid_mask.c"
MASKS = ("avx2",)
MARKER = "SPARSE_RUNTIME_ISA_MASK"  # set in the masked process: benchmarks name the mask in their notes
# the engines' own switches, set too (each also restricts its engine where the CPUID mask alone would
# leave a choice: our kernels' path, torch's dispatch, oneDNN, MKL, DeepSparse's binary)
ENGINE_SWITCHES = {"SPARSE_RUNTIME_KERNEL_ISA": "avx2", "SPARSE_RUNTIME_AMX": "0", "ATEN_CPU_CAPABILITY": "avx2",
                   "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "NM_ARCH": "avx2"}
GLIBC_OFF = "glibc.cpu.hwcaps=-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD,-AVX_VNNI"


class MaskError(RuntimeError):
    """The mask cannot be applied here (one line that says why and what to do)."""


def cpuid_faulting() -> bool:
    try:
        return "cpuid_fault" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def build(cache: Path | None = None) -> Path:
    """The compiled mask library (rebuilt when the source changes)."""
    if not sys.platform.startswith("linux"):
        raise MaskError("the ISA mask needs Linux (arch_prctl ARCH_SET_CPUID); run the benchmark unmasked")
    if not cpuid_faulting():
        raise MaskError("this CPU or hypervisor cannot make CPUID fault (no cpuid_fault flag in /proc/cpuinfo); "
                        "emulate AVX2 elsewhere or run on an AVX2 machine")
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise MaskError("no C compiler to build the ISA mask: install gcc (or set CC)")
    src = SOURCE.read_bytes()
    from sparse_runtime.models.loading import cache_dir  # the project's cache, as elsewhere

    out_dir = (cache or cache_dir()) / "isa_mask"
    out = out_dir / f"cpuid_mask-{hashlib.sha256(src).hexdigest()[:12]}.so"
    if not out.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        proc = subprocess.run([cc, "-O2", "-Wall", "-shared", "-fPIC", str(SOURCE), "-o", str(tmp), "-ldl"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise MaskError(f"building the ISA mask failed: {proc.stderr.strip().splitlines()[-1:]}")
        tmp.replace(out)  # complete before it is used
    return out


def masked_env(mask: str, env: dict[str, str] | None = None, cache: Path | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with ``mask`` applied."""
    if mask not in MASKS:
        raise MaskError(f"unknown ISA mask {mask!r}; choose from {', '.join(MASKS)}")
    env = dict(os.environ if env is None else env)
    lib = str(build(cache))
    env["LD_PRELOAD"] = lib + (":" + env["LD_PRELOAD"] if env.get("LD_PRELOAD") else "")
    env["GLIBC_TUNABLES"] = GLIBC_OFF + (":" + env["GLIBC_TUNABLES"] if env.get("GLIBC_TUNABLES") else "")
    env.update(ENGINE_SWITCHES)
    env[MARKER] = mask
    return env


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python benchmarks/isa_mask.py avx2 -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    try:
        env = masked_env(argv[0])
    except MaskError as e:
        print(f"isa_mask: {e}", file=sys.stderr)
        return 2
    os.execvpe(argv[2], argv[2:], env)
    return 0  # not reached


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    raise SystemExit(main(sys.argv[1:]))
