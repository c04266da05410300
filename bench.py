"""Benchmarks: time and peak memory of the losses, forward + backward, fused vs eager vs compiled.

    python bench.py                      # GPU: N = 1k..64k, bf16 and fp32; CPU: small sizes, fp32
    python bench.py --loss clip --sizes 4096 16384 --dtypes bf16
    python bench.py --json out/bench.json

For each loss (clip: kernels.clip_loss; tag: kernels.tag_loss, softmax, K tags, about 10 tags per
image, frozen tag embeddings as in TagAlign), dtype and batch size N it runs forward + backward
of each implementation:
  triton   the fused Triton kernels (the default "fused" on GPU),
  chunked  the same algorithm in torch, row blocks (the default "fused" on CPU, where Triton only
           runs in its interpreter, far too slow to time; pass --impls triton to try it),
  torch    the eager reference (kernels.clip_loss_ref / tag_loss_ref: the N x N or N x K logits),
  compile  torch.compile of that reference (compile time excluded: it runs in the warm-up).
Time is the median of --repeat runs after --warmup runs. Peak memory is what the run adds on
top of its inputs (the inputs' gradients included): torch.cuda.max_memory_allocated on GPU; on
CPU the growth of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs
after malloc_trim, with glibc's mmap threshold pinned so that freed tensors leave the resident
set), which counts every allocation, torch's or not, to within pages. An out-of-memory run is
reported as OOM and the sweep goes on.
"""
import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import kernels

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- peak memory
class PeakMemory:
    """Bytes a piece of work adds at its peak over what was allocated when it started."""

    def __init__(self, device):
        self.device = device
        self.libc = None
        if device.type == "cpu":
            try:
                self.libc = ctypes.CDLL("libc.so.6")
                open("/proc/self/clear_refs", "w").write("5")  # can the peak be reset here?
                # Pin glibc's mmap threshold (it grows after frees otherwise): every block over
                # 256 KiB is then its own mapping, returned when freed, so RSS follows the live
                # tensors (the chunked path at N=4096 read 204 MiB unpinned, 78 MiB pinned).
                self.libc.mallopt(-3, 256 * 1024)  # -3: M_MMAP_THRESHOLD
            except (OSError, AttributeError):
                self.libc = False  # not Linux/glibc: no CPU memory figures

    @staticmethod
    def _status_kib(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        elif self.libc:
            self.libc.malloc_trim(0)  # give freed heap back, so it is not reused unseen
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # peak RSS := current RSS
            self.base = self._status_kib("VmRSS:") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        elif self.libc:
            self.peak = self._status_kib("VmHWM:") * 1024 - self.base
        else:
            self.peak = float("nan")


# ----------------------------------------------------------------------------- workloads
def make_inputs(loss, N, D, K, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)  # drawn where they live: no copies
    unit = lambda n: F.normalize(  # noqa: E731
        torch.randn(n, D, generator=g, device=device), dim=1).to(dtype)
    scale = torch.tensor(14.3, device=device, requires_grad=True)
    if loss == "clip":
        return {"image_emb": unit(N).requires_grad_(), "text_emb": unit(N).requires_grad_(),
                "scale": scale}
    targets = torch.rand(N, K, generator=g, device=device) < 10.0 / K  # ~10 tags per image
    return {"image_emb": unit(N).requires_grad_(), "tag_emb": unit(K), "targets": targets,
            "scale": scale}


def loss_fn(loss, impl):
    """A function of the inputs dict for one implementation."""
    if loss == "clip":
        ref = kernels.clip_loss_ref
        fused = lambda impl_: lambda a: kernels.clip_loss(**a, impl=impl_)  # noqa: E731
    else:
        ref = kernels.tag_loss_ref
        fused = lambda impl_: lambda a: kernels.tag_loss(**a, impl=impl_)  # noqa: E731
    if impl == "torch":
        return lambda a: ref(**a)
    if impl == "compile":
        torch._dynamo.reset()  # a fresh compile per configuration: no recompile limit, no reuse
        compiled = torch.compile(ref)
        return lambda a: compiled(**a)
    return fused(impl)


def measure(fn, inputs, device, warmup, repeat):
    """Median seconds and peak bytes of forward + backward."""
    def step():
        for t in inputs.values():
            t.grad = None
        fn(inputs).backward()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    for t in inputs.values():
        t.grad = None  # the measured peak includes the gradients every implementation makes
    times = []
    with PeakMemory(device) as mem:
        for _ in range(repeat):
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), mem.peak


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------- CLI
def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--loss", nargs="+", choices=["clip", "tag"], default=["clip", "tag"],
                   help="which losses to time (default: both)")
    p.add_argument("--sizes", nargs="+", type=int, default=None,
                   help="batch sizes N (default: 1024 ... 65536 on GPU, 512 ... 4096 on CPU)")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=None,
                   help="embedding dtypes (default: bf16 fp32 on GPU, fp32 on CPU)")
    p.add_argument("--impls", nargs="+", choices=["triton", "chunked", "torch", "compile"],
                   default=None, help="implementations (default: triton torch compile on GPU, "
                   "chunked torch compile on CPU)")
    p.add_argument("--dim", type=int, default=512, help="embedding size D (default: 512)")
    p.add_argument("--tags", type=int, default=10000, help="tag vocabulary K (default: 10000)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per cell (default: 5)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed runs first (compilation, autotuning; default: 2)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="where to run (default: cuda if available)")
    p.add_argument("--json", default=None, help="also write the rows and arguments to this file")
    args = p.parse_args()

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    device = torch.device("cuda" if args.device == "cuda" or (
        args.device == "auto" and torch.cuda.is_available()) else "cpu")
    gpu = device.type == "cuda"
    sizes = args.sizes or ([1024 * 2 ** i for i in range(7)] if gpu else [512, 1024, 2048, 4096])
    dtypes = args.dtypes or (["bf16", "fp32"] if gpu else ["fp32"])
    impls = args.impls or (["triton", "torch", "compile"] if gpu else ["chunked", "torch",
                                                                      "compile"])
    if min(sizes) < 1 or args.dim < 1 or args.tags < 1 or args.repeat < 1 or args.warmup < 0:
        p.error("--sizes, --dim, --tags and --repeat must be positive, --warmup >= 0")
    if "triton" in impls and not gpu:
        print("note: impl triton on CPU runs in Triton's interpreter: seconds per call")

    name = device_name(device)
    print(f"device: {name}; torch {torch.__version__}; D={args.dim}, K={args.tags} (tag loss), "
          f"median of {args.repeat} forward+backward runs")
    head = f"{'loss':5} {'dtype':5} {'N':>6} {'impl':8} {'ms':>10} {'peak MiB':>10} " \
           f"{'time/torch':>10} {'mem/torch':>10}"
    print(head)
    print("-" * len(head))
    rows = []
    for loss in args.loss:
        for dt in dtypes:
            for N in sizes:
                cell = {}
                for impl in impls:
                    row = {"loss": loss, "dtype": dt, "N": N, "impl": impl, "D": args.dim,
                           "K": args.tags if loss == "tag" else None}
                    try:
                        inputs = make_inputs(loss, N, args.dim, args.tags, DTYPES[dt], device)
                        sec, peak = measure(loss_fn(loss, impl), inputs, device, args.warmup,
                                            args.repeat)
                        row.update(ms=sec * 1e3, peak_mib=peak / 2 ** 20)
                    except torch.OutOfMemoryError:
                        row.update(ms=None, peak_mib=None, error="OOM")
                    except Exception as e:  # e.g. a compile failure: report it, keep going
                        row.update(ms=None, peak_mib=None,
                                   error=f"{type(e).__name__}: {str(e).splitlines()[0][:60]}")
                    inputs = None
                    gc.collect()
                    if gpu:
                        torch.cuda.empty_cache()
                    cell[impl] = row
                    rows.append(row)
                base = cell.get("torch", {})
                for impl, row in cell.items():  # ratios against the eager reference's cell
                    if "error" in row:
                        print(f"{loss:5} {dt:5} {N:6d} {impl:8} {row['error']}")
                        continue
                    ratio = [f"{row[k] / base[k]:10.3f}" if base.get(k) else f"{'-':>10}"
                             for k in ("ms", "peak_mib")]
                    print(f"{loss:5} {dt:5} {N:6d} {impl:8} {row['ms']:10.2f} "
                          f"{row['peak_mib']:10.1f} {ratio[0]} {ratio[1]}", flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "args": vars(args),
                       "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
