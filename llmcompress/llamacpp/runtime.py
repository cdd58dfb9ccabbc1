"""Where llama.cpp lives, and ``llmcompress setup llamacpp``, which builds a pinned copy of it once.

The package index carries llama.cpp's source inside the ``llama-cpp-python`` sdist (``vendor/llama.cpp``). ``setup``
downloads that sdist, builds the tools we drive (llama-quantize, llama-imatrix, llama-perplexity, llama-bench,
llama-server) and the shared libraries with ``GGML_NATIVE`` for this CPU, and installs llama-cpp-python's Python
bindings *without* their own native build, pointed at those libraries (``LLAMA_CPP_LIB_PATH``): one build, one
llama.cpp commit for the tools, the bindings and the converter (``convert_hf_to_gguf.py`` with its own ``gguf-py``).

Folder: ``$LLMCOMPRESS_LLAMACPP_DIR`` (default ``<user cache>/llmcompress/llamacpp``); ``llmcompress-setup.json`` in
it records what was built, on which CPU. A native build uses this CPU's instructions: on a machine whose CPU lacks
one of them the tools would die of SIGILL, so that is refused with the fix (``setup llamacpp --force``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable

from ..errors import LLMCompressError
from ..serving.support import cpu_flags
from ..utils.proc import run_checked

#: The llama-cpp-python release whose sdist vendors the llama.cpp we build (llama.cpp commit 0c1e570, Oct 2026).
PIN = "0.3.36"
LLAMA_CPP_COMMIT = "0c1e570"
#: Tools built (the shared libraries come with them).
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench", "llama-server")
#: CMake options: native CPU code, no network (curl, openssl, the server's web UI from the hub), no tests/examples.
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_CURL=OFF",
               "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
               "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_APP=OFF",
               "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF")
#: x86: AMX compiled out of the native build. ggml's AMX weight layout (its "AMX" extra buffer type, llama.cpp
#: 0c1e570) segfaults on the first quantized matmul on AMX Xeons (Q4_K_M/Q4_0/Q8_0 of SmolLM2 in llama-bench,
#: llama-perplexity and a plain ``llama_cpp.Llama(...)``; F16 is fine): a build without it serves every tool and the
#: bindings as a user calls them, and keeps the AVX-512/AVX2 repacking. Explicit ``-mno-*`` wins over -march=native.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
#: What the converter needs beyond transformers/torch (it imports sentencepiece even for BPE tokenizers).
CONVERTER_PACKAGES = ("sentencepiece",)
STAMP = "llmcompress-setup.json"
#: The CPU's vector ISA flags, as benchmarks report them beside their figures.
_ISA_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
              "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
#: Those a native ggml build may use (AMX is compiled out: NO_AMX): a machine must have every one the build
#: machine had.
_BUILD_FLAGS = tuple(f for f in _ISA_FLAGS if not f.startswith("amx"))


def isa_flags() -> list[str]:
    """This CPU's vector ISA flags (of ``_ISA_FLAGS``), sorted: what benchmarks write beside their figures."""
    return sorted(cpu_flags() & set(_ISA_FLAGS))


def root() -> Path:
    from ..utils.cache import cache_dir

    return Path(os.environ.get("LLMCOMPRESS_LLAMACPP_DIR") or cache_dir("llamacpp"))


def source_dir(folder: Path | None = None) -> Path:
    return (folder or root()) / "src" / "vendor" / "llama.cpp"


def bin_dir(folder: Path | None = None) -> Path:
    return (folder or root()) / "build" / "bin"


def installed(folder: Path | None = None) -> dict | None:
    """What ``setup`` recorded in ``folder`` (None when it never finished)."""
    try:
        data = json.loads(((folder or root()) / STAMP).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def cmake_flags() -> tuple[str, ...]:
    """``CMAKE_FLAGS``, plus AMX compiled out on x86 (``NO_AMX``)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "i386"):
        return CMAKE_FLAGS
    return (*CMAKE_FLAGS, f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}")


def _built(folder: Path, stamp: dict | None) -> bool:
    """``setup`` finished in ``folder`` for this pin with these CMake options, and every tool is there."""
    return (bool(stamp) and stamp.get("pin") == PIN and stamp.get("cmake") == list(cmake_flags())
            and all((bin_dir(folder) / t).is_file() for t in TOOLS))


def require(what: str) -> Path:
    """The llama.cpp folder, set up and usable on this CPU; else LLMCompressError with the fix."""
    folder = root()
    stamp = installed(folder)
    if not _built(folder, stamp):
        why = "is not set up" if stamp is None else f"in {folder} is incomplete or another version"
        raise LLMCompressError(
            f"{what} needs llama.cpp, which {why}. Fix: run `llmcompress setup llamacpp` (builds llama.cpp "
            f"{LLAMA_CPP_COMMIT} from the llama-cpp-python {PIN} sdist into {folder}: ~7 min once on 2 cores)."
        )
    missing = sorted(set(stamp.get("cpu_flags", [])) - cpu_flags())
    if missing:
        raise LLMCompressError(
            f"{what}: the llama.cpp in {folder} was built for a CPU with {', '.join(missing)}, which this one lacks "
            "(its tools would die of an illegal instruction). Fix: `llmcompress setup llamacpp --force` rebuilds "
            "it for this CPU."
        )
    return folder


def tool(name: str, what: str) -> Path:
    return bin_dir(require(what)) / name


def converter(what: str) -> tuple[list[str], dict[str, str]]:
    """The command prefix of llama.cpp's ``convert_hf_to_gguf.py`` and the environment it runs in (its own gguf-py,
    which must match its llama.cpp commit, ahead of the installed ``gguf``)."""
    src = source_dir(require(what))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(src / "gguf-py"),
                                                                     os.environ.get("PYTHONPATH")]))}
    return [sys.executable, str(src / "convert_hf_to_gguf.py")], env


def import_llama_cpp(what: str):
    """``llama_cpp`` (llama-cpp-python), bound to the libraries ``setup`` built."""
    folder = require(what)
    os.environ["LLAMA_CPP_LIB_PATH"] = str(bin_dir(folder))
    try:
        import llama_cpp
    except ImportError as e:
        raise LLMCompressError(f"{what}: llama-cpp-python does not import ({e}). Fix: run "
                               "`llmcompress setup llamacpp --force`.") from None
    return llama_cpp


# ---------------------------------------------------------------------------------------------------------------------


def setup(force: bool = False, folder: Path | None = None, jobs: int | None = None,
          log: Callable[[str], None] = print) -> Path:
    """Build (or reuse) llama.cpp; return its folder. Idempotent: built for this pin and CPU -> nothing to do."""
    folder = Path(folder or root())
    stamp = installed(folder)
    flags = sorted(cpu_flags() & set(_BUILD_FLAGS))
    if (not force and _built(folder, stamp) and set(stamp.get("cpu_flags", [])) <= set(flags)
            and _bindings_ok(folder)):
        log(f"llama.cpp in {folder} is up to date (llama-cpp-python {PIN}, llama.cpp {LLAMA_CPP_COMMIT})")
        return folder
    _check_ours(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STAMP).unlink(missing_ok=True)
    t0 = time.perf_counter()
    sdist = _download(folder, log)
    _unpack(sdist, folder / "src", log)
    jobs = jobs or os.cpu_count() or 2
    build = folder / "build"
    log(f"configuring llama.cpp ({' '.join(cmake_flags())})")
    _call(["cmake", "-S", str(source_dir(folder)), "-B", str(build), *cmake_flags()], folder)
    log(f"building {', '.join(TOOLS)} with {jobs} jobs (~7 min on 2 cores)")
    _call(["cmake", "--build", str(build), "-j", str(jobs), "--target", *TOOLS], folder)
    log(f"installing llama-cpp-python {PIN} (bindings only, bound to that build) and {', '.join(CONVERTER_PACKAGES)}")
    env = {**os.environ, "CMAKE_ARGS": "-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF"}
    _call([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off",
           str(sdist), *CONVERTER_PACKAGES], folder, env=env)
    if not _bindings_ok(folder):
        raise LLMCompressError(f"setup llamacpp: llama-cpp-python does not load the libraries in {bin_dir(folder)}. "
                               "Fix: run `llmcompress setup llamacpp --force`.")
    (folder / STAMP).write_text(json.dumps({"pin": PIN, "llama_cpp": LLAMA_CPP_COMMIT, "cmake": list(cmake_flags()),
                                            "cpu_flags": flags, "build_s": round(time.perf_counter() - t0)}))
    log(f"llama.cpp ready in {folder} ({time.perf_counter() - t0:.0f} s)")
    return folder


def _bindings_ok(folder: Path) -> bool:
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(bin_dir(folder))}
    probe = "import llama_cpp; llama_cpp.llama_backend_init(); print(llama_cpp.__version__)"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    return proc.returncode == 0 and proc.stdout.strip() == PIN


def _download(folder: Path, log: Callable[[str], None]) -> Path:
    dl = folder / "sdist"
    found = sorted(dl.glob(f"llama_cpp_python-{PIN}.tar.gz")) if dl.is_dir() else []
    if found:
        return found[0]
    log(f"downloading the llama-cpp-python {PIN} sdist (llama.cpp's source) from the package index")
    _call([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
           "-d", str(dl), f"llama-cpp-python=={PIN}"], folder)
    found = sorted(dl.glob(f"llama_cpp_python-{PIN}.tar.gz"))
    if not found:
        raise LLMCompressError(f"setup llamacpp: pip downloaded no llama_cpp_python-{PIN}.tar.gz into {dl}. "
                               "Fix: check the package index has the llama-cpp-python sdist.")
    return found[0]


def _unpack(sdist: Path, target: Path, log: Callable[[str], None]) -> None:
    if (target / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        return
    log(f"unpacking {sdist.name}")
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp, filter="data")  # no links out of the folder, no devices
    inner = next(tmp.iterdir())
    shutil.rmtree(target, ignore_errors=True)
    inner.rename(target)
    shutil.rmtree(tmp, ignore_errors=True)


def _check_ours(folder: Path) -> None:
    """Refuse to build into a folder ``setup`` did not make (a user's own llama.cpp checkout, say)."""
    if folder.exists() and not folder.is_dir():
        raise LLMCompressError(f"setup llamacpp: `{folder}` is a file. Fix: set LLMCOMPRESS_LLAMACPP_DIR to a new "
                               "folder, or remove that file.")
    ours = {"sdist", "src", "src.tmp", "build", STAMP}
    if folder.is_dir() and any(p.name not in ours for p in folder.iterdir()):
        raise LLMCompressError(
            f"setup llamacpp: `{folder}` holds files `setup` did not write, so nothing is built into it. Fix: set "
            "LLMCOMPRESS_LLAMACPP_DIR to a new or empty folder."
        )


def _call(cmd: list[str], folder: Path, env: dict | None = None) -> None:
    run_checked(cmd, "setup llamacpp", "check a C++ compiler and cmake are installed (apt-get install build-essential "
                "cmake) and the package index is reachable, then run `llmcompress setup llamacpp` again (it resumes "
                f"in {folder}).", env=env)
