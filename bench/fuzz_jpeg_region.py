"""Fuzz the partial JPEG decoder (data_pipeline/image/_jpeg_region.c) under AddressSanitizer + UBSan.

Builds the extension with ``-fsanitize=address,undefined`` in a temporary directory (gcc or clang; the
installed one is untouched), writes a corpus of mutated JPEGs (every layout libjpeg decodes, then byte
flips, truncations, frame headers claiming other sizes, dropped and repeated segments), and decodes each
at the four DCT scales with random region boxes (inside, at the edges, outside, wrapping past 2^32) in a
child process that loads the sanitizer runtime. Any sanitizer report ends the child: the script prints it,
keeps the input that caused it, and exits 1. Otherwise it prints and saves (JSON) the corpus size and how
the inputs ended (pixels / ValueError).

    python bench/fuzz_jpeg_region.py                        # 5000 inputs, ~2 minutes on 2 cores
    python bench/fuzz_jpeg_region.py --inputs 50000 --seed 7 --out bench/results/fuzz_jpeg_region.json
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "data_pipeline" / "image" / "_jpeg_region.c"
MAX_PIXELS = 50_000_000  # what the transforms pass: headers above it are refused before allocation


def build(out_dir: Path, compiler: str) -> Path:
    """The extension built with the sanitizers into ``out_dir``; returns the shared object's path."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    target = out_dir / f"_jpeg_region{suffix}"
    cmd = [compiler, "-shared", "-fPIC", "-g", "-O1", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
           "-fno-sanitize-recover=undefined", f"-I{sysconfig.get_paths()['include']}", str(SOURCE), "-ljpeg",
           "-o", str(target)]
    subprocess.run(cmd, check=True)
    return target


def runtime(compiler: str) -> str:
    """The ASan runtime to preload into the (uninstrumented) Python interpreter."""
    for name in ("libasan.so", "libclang_rt.asan-x86_64.so"):
        path = subprocess.run([compiler, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        if os.path.isabs(path) and os.path.exists(path):
            return path
    raise SystemExit(f"{compiler} has no ASan runtime to preload (libasan.so)")


def _bases() -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for w, h in ((1, 1), (7, 5), (17, 33), (64, 48), (131, 97)):
        y, x = np.mgrid[0:h, 0:w]
        base = 128 + 60 * np.sin(x / 5.0) * np.cos(y / 7.0) + rng.normal(0, 10, (h, w))
        rgb = Image.fromarray(np.clip(np.stack([base, np.roll(base, 3, 1), 255 - base], -1), 0, 255).astype(np.uint8))
        for mode, save in (("RGB", dict(subsampling=2)), ("RGB", dict(subsampling=1)), ("RGB", dict(subsampling=0)),
                           ("RGB", dict(progressive=True)), ("RGB", dict(restart_marker_blocks=1)),
                           ("L", dict()), ("L", dict(progressive=True)), ("RGB", dict(optimize=True)),
                           ("CMYK", dict())):
            buf = io.BytesIO()
            rgb.convert(mode).save(buf, "JPEG", quality=int(rng.integers(5, 100)), **save)
            out.append(buf.getvalue())
    return out


def _segments(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each marker segment before the scan data."""
    out, i = [], 2
    while i + 4 <= len(data) and data[i] == 0xFF and data[i + 1] != 0xDA:
        end = i + 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
        out.append((i, end))
        i = end
    return out


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    out = bytearray(data)
    kind = int(rng.integers(0, 6))
    if kind == 0:  # byte flips anywhere
        for at in rng.integers(0, len(out), int(rng.integers(1, 9))):
            out[int(at)] = int(rng.integers(0, 256))
    elif kind == 1:  # truncated
        out = out[:int(rng.integers(2, len(out)))]
    elif kind == 2:  # the frame header claims another size (up to 65535 each side)
        for start, end in _segments(data):
            if out[start + 1] in (0xC0, 0xC1, 0xC2) and end <= len(out):
                size = rng.choice([0, 1, 2, 8, 9, 16, 255, 4096, 20000, 65535], 2)
                out[start + 5:start + 9] = struct.pack(">HH", *(int(s) for s in size))
    elif kind == 3:  # a header segment dropped or repeated
        segs = _segments(data)
        if segs:
            start, end = segs[int(rng.integers(0, len(segs)))]
            out = out[:start] + (out[start:end] * 2 if rng.random() < 0.5 else b"") + out[end:]
    elif kind == 4:  # flips inside the headers only (tables, sampling factors, component counts)
        segs = _segments(data)
        end = min(segs[-1][1] if segs else len(out), len(out))
        for at in rng.integers(2, max(3, end), int(rng.integers(1, 5))):
            if at < len(out):
                out[int(at)] = int(rng.integers(0, 256))
    else:  # a slice of the scan data repeated (Huffman garbage of the right shape)
        cut = int(rng.integers(2, len(out)))
        out = out[:cut] + out[max(2, cut - 64):cut] + out[cut:]
    return bytes(out)


def child(module_dir: str, corpus: str, seed: int) -> None:
    """Runs under the sanitizer runtime: every input at every scale with random boxes."""
    if os.path.exists("/proc/self/maps") and "asan" not in Path("/proc/self/maps").read_text():
        raise SystemExit("the sanitizer runtime is not loaded: nothing would be found")
    sys.path.insert(0, module_dir)
    import _jpeg_region  # the instrumented build
    import simplejpeg

    rng = np.random.default_rng(seed)
    counts = {"pixels": 0, "ValueError": 0}
    for path in sorted(Path(corpus).iterdir()):
        data = path.read_bytes()
        Path(corpus, "current").write_text(path.name)
        try:
            h, w = simplejpeg.decode_jpeg_header(data)[:2]
        except Exception:  # noqa: BLE001 - a header simplejpeg refuses: boxes are drawn blind
            h, w = int(rng.integers(1, 200)), int(rng.integers(1, 200))
        for d in (1, 2, 4, 8):
            sw, sh = -(-w // d), -(-h // d)
            for box in range(3):
                if box == 0:  # inside
                    rw, rh = int(rng.integers(1, max(2, sw + 1))), int(rng.integers(1, max(2, sh + 1)))
                    left, top = int(rng.integers(0, max(1, sw - rw + 1))), int(rng.integers(0, max(1, sh - rh + 1)))
                elif box == 1:  # at or past the edges
                    rw, rh = int(rng.integers(1, 40)), int(rng.integers(1, 40))
                    left, top = int(rng.integers(max(0, sw - rw - 2), sw + 3)), int(rng.integers(0, sh + 3))
                else:  # coordinates that wrap a 32-bit sum
                    rw, rh = int(rng.integers(1, 40)), int(rng.integers(1, 40))
                    left, top = int(2**32 - rng.integers(1, 64)), int(rng.integers(0, 2))
                rw, rh = min(rw, 4096), min(rh, 4096)
                out = np.empty((rh, rw, 3), np.uint8)
                try:
                    _jpeg_region.decode_region(data, out, d, left, top, MAX_PIXELS)
                    counts["pixels"] += 1
                except ValueError:
                    counts["ValueError"] += 1
    Path(corpus, "current").unlink()
    print(json.dumps(counts))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inputs", type=int, default=5000, help="mutated JPEGs in the corpus")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cc", default=os.environ.get("CC", "gcc"))
    p.add_argument("--out", default="", help="JSON result file (e.g. bench/results/fuzz_jpeg_region.json)")
    p.add_argument("--keep", default="", help="keep the corpus in this directory")
    p.add_argument("--child", nargs=3, metavar=("MODULE_DIR", "CORPUS", "SEED"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child[0], a.child[1], int(a.child[2]))
        return 0
    if shutil.which(a.cc) is None:
        print(f"no C compiler {a.cc!r}: set --cc or CC", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="fuzz_jpeg_region-"))
    corpus = Path(a.keep) if a.keep else work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    build(work, a.cc)
    rng = np.random.default_rng(a.seed)
    bases = _bases()
    for i, base in enumerate(bases):  # the layouts themselves, unmutated
        (corpus / f"base-{i:03d}.jpg").write_bytes(base)
    for i in range(a.inputs):
        data = bases[int(rng.integers(0, len(bases)))]
        for _ in range(int(rng.integers(1, 4))):  # one to three stacked mutations
            data = mutate(data, rng) if len(data) > 4 else data
        (corpus / f"m-{i:06d}.jpg").write_bytes(data)
    env = dict(os.environ, LD_PRELOAD=runtime(a.cc), ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:exitcode=86",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:exitcode=87")
    start = time.monotonic()
    run = subprocess.run([sys.executable, __file__, "--child", str(work), str(corpus), str(a.seed)], env=env,
                         capture_output=True, text=True)
    seconds = time.monotonic() - start
    total = len(bases) + a.inputs
    if run.returncode != 0:
        current = (corpus / "current").read_text() if (corpus / "current").exists() else "?"
        kept = Path(tempfile.gettempdir()) / f"fuzz_jpeg_region-crash-{current}"
        if current != "?":
            shutil.copy(corpus / current, kept)
        print(run.stderr[-6000:], file=sys.stderr)
        print(f"FINDING: exit {run.returncode} on {current} (kept as {kept}); corpus of {total} inputs in {corpus}",
              file=sys.stderr)
        return 1
    counts = json.loads(run.stdout.strip().splitlines()[-1])
    import PIL
    import simplejpeg

    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
              "load_average": os.getloadavg(), "python": platform.python_version(), "pillow": PIL.__version__,
              "simplejpeg": simplejpeg.__version__, "compiler": subprocess.run([a.cc, "--version"], capture_output=True,
                                                                                text=True).stdout.splitlines()[0],
              "sanitizers": "address,undefined", "corpus": total, "layouts": len(bases), "seed": a.seed,
              "decodes": sum(counts.values()), "ended": counts, "findings": 0,
              "decode_seconds": round(seconds, 1)}
    print(json.dumps(result, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    if not a.keep:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
