"""kernels/: every Triton kernel compiles for real NVIDIA GPUs, and every config the autotuner
may pick there fits the GPU's shared memory.

The other kernel tests run the kernels through Triton's CPU interpreter, which checks neither.
Triton compiles for a GPU without one: triton.compile(ASTSource(...), target=GPUTarget("cuda",
cc, 32)) runs the whole pipeline down to a cubin with the ptxas that ships in the triton wheel,
and the result's metadata says how much shared memory a block needs. That happens here in a
subprocess (this file run as a script): TRITON_INTERPRET must be 0 before `kernels` is
imported, and conftest.py turns it on in the pytest process.

What is compiled is what the launchers launch: the public functions run on meta tensors (shapes
and dtypes, no data) with every autotuned kernel replaced by a stub that records its arguments,
so each kernel is compiled with the signature, specialisation and constexpr branches (DENSE_T,
HAS_COL, HAS_Q_TERM, HAS_K_TERM, POS_ON_Q, ROWS_ON_Q, PRECISION) of a real launch; nothing here
repeats them. The configs a GPU may pick are those the kernels' own early_config_prune keeps
for that GPU's shared-memory limit.

Compiling takes seconds per config (a minute for some fp32 backward ones), so by default only
24 compiles run, at D = 1024: each kernel for each dtype on each GPU (DEFAULT_COMBOS), with the
largest config by bound that the GPU may pick and the kernel's constexpr branches taken in turn,
so that every branch is compiled once. The prune and its bound are still checked for every
launch, config and GPU. TAGALIGN_FULL_COMPILE=1 adds the full sweep: every launch, config
(pruned ones too, to check the bound that prunes them), D and GPU, about 1,500 distinct
compiles. Triton caches what it compiled (~/.triton/cache, or TRITON_CACHE_DIR): a second run
takes seconds.
"""
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

# Shared memory one block may use: the opt-in maximum, which triton checks at launch (bytes).
GPUS = {80: 166912,   # sm_80, A100: 163 KiB
        90: 232448}   # sm_90, H100 / H200: 227 KiB
# D is a runtime argument, specialised only on its divisibility by 16; the backward's BLOCK_D
# (D rounded up to a power of two) is a constexpr and sets its shared memory. So 512, 768 and
# 1024 compile one forward, and 768 and 1024 one backward (Triton's cache compiles each once).
DIMS = (512, 768, 1024)
# bf16, fp16, and fp32 with both dots the launchers pick from torch's matmul precision:
# "highest" (torch's default) -> ieee, anything else -> tf32.
DTYPES = [("bfloat16", "highest"), ("float16", "highest"), ("float32", "high"),
          ("float32", "highest")]
# The default run's (dtype, precision, cc) combos: each dtype on each GPU, fp32's two dots on
# one GPU each. With the constexpr branches taken in turn, 6 combos cover each kernel's
# branches (at most 6, of the ITC backward) in 24 compiles.
DEFAULT_COMBOS = [("bfloat16", "highest", 80), ("bfloat16", "highest", 90),
                  ("float16", "highest", 80), ("float16", "highest", 90),
                  ("float32", "highest", 80), ("float32", "high", 90)]
N = 4096  # rows and tags: a multiple of 16, as real batches are, so the launch is specialised
#           the same way (aligned, vectorised loads, hence pipelined: the most shared memory)
FULL = os.environ.get("TAGALIGN_FULL_COMPILE") == "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNAVAILABLE = 3  # the worker's exit status when triton cannot compile for CUDA here


# ----------------------------------------------------------------------------- worker (subprocess)
def record_launches(D, dtype, precision):
    """Every distinct kernel launch the public functions make for (N, D) inputs:
    [(autotuner, positional args, keyword args)], recorded by stubs on meta tensors."""
    import importlib

    import torch
    import triton

    import kernels
    modules = [importlib.import_module(m) for m in ("kernels.clip_loss", "kernels.tag_loss")]
    launches = {}

    class Recorder:  # stands in for `kernel[grid](*args, **kw)`
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kw):
                types = [str(a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
                key = (self.kernel.fn.__name__, str(types), str(sorted(kw.items())))
                launches.setdefault(key, (self.kernel, args, kw))
            return launch

    autotuned = [(m, name, k) for m in modules for name, k in vars(m).items()
                 if isinstance(k, triton.runtime.Autotuner)]
    for m, name, k in autotuned:
        setattr(m, name, Recorder(k))
    # the tag loss's capped positives are found with nonzero(), which meta tensors cannot run
    capped = modules[0]._capped_positives
    modules[0]._capped_positives = lambda x, y, s, t, m, *_: (torch.zeros_like(m),) * 2
    torch.set_float32_matmul_precision(precision)
    dtype = getattr(torch, dtype)
    try:
        def emb(rows, grad=True):
            return torch.empty(rows, D, dtype=dtype, device="meta", requires_grad=grad)

        s = torch.empty((), device="meta", requires_grad=True)
        kernels.clip_loss(emb(N), emb(N), s, impl="triton").backward()
        for grad_keys in (True, False):
            kernels.clip_loss_one_sided(emb(N), emb(N, grad_keys), s, impl="triton").backward()
        for tdtype in (torch.bool, torch.float32):
            targets = torch.empty(N, N, dtype=tdtype, device="meta")
            for kind in ("softmax", "bce"):
                for grad_w in (True, False):
                    kernels.tag_loss(emb(N), emb(N, grad_w), targets, s, kind=kind,
                                     impl="triton").backward()
    finally:
        for m, name, k in autotuned:
            setattr(m, name, k)
        modules[0]._capped_positives = capped
    return list(launches.values())


def compile_for(cc, kernel, args, kw, config):
    """triton.compile of one launch with one config for sm_<cc>: the CompiledKernel.

    Signature, constexprs and alignment attributes come from triton's own binder, as in
    JITFunction.run (private API, as of triton 3.7-3.9)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    fn = kernel.fn
    kw = dict(kw, **config.all_kwargs())
    bind = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = bind(*args, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, specialization,
                                                          options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


def main(out_path, full):
    """Write one JSON line per (launch, GPU, config): whether the prune keeps it, its bound
    and, if compiled, its shared memory or the compile error."""
    os.environ["TRITON_INTERPRET"] = "0"  # before `kernels` is imported
    sys.path.insert(0, ROOT)
    import importlib

    import triton
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        make_backend(GPUTarget("cuda", 90, 32))
        assert os.path.exists(triton.knobs.nvidia.ptxas.path), "no ptxas"
    except Exception as e:  # noqa: BLE001 -- whatever the reason, no CUDA compiles here
        print(f"triton cannot compile for CUDA here: {type(e).__name__}: {e}")
        sys.exit(UNAVAILABLE)
    clip_mod = importlib.import_module("kernels.clip_loss")
    records, jobs = [], []
    for dtype, precision in DTYPES:
        for D in (DIMS if full else DIMS[-1:]):
            launches = record_launches(D, dtype, precision)
            for cc, limit in GPUS.items():
                clip_mod.device_shared_memory = lambda device, gpu=(cc, limit): gpu
                for kernel, args, kw in launches:
                    for rec, job in plan(kernel, args, kw, (dtype, precision, cc), launches,
                                         clip_mod.shared_memory_bound, full):
                        rec.update(D=D, dtype=dtype)
                        records.append(rec)
                        jobs.append((rec, job))
    # triton.compile may run in threads (triton's own async compile mode does so); ptxas and
    # much of the MLIR pipeline run outside the GIL
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(lambda rec_job: compile_into(*rec_job), [j for j in jobs if j[1]]))
    with open(out_path, "w") as out:
        out.writelines(json.dumps(rec) + "\n" for rec in records)


def plan(kernel, args, kw, combo, launches, bound_of, full):
    """(record, compile job or None) for each config of one launch; combo: (dtype, precision,
    cc). Compiled: in full, every config; by default, for each kernel and DEFAULT_COMBOS entry,
    one constexpr branch (taken in turn, so each is compiled once) with the largest config by
    bound that the prune keeps for the GPU."""
    kept = kernel.early_config_prune(kernel.configs, dict(zip(kernel.arg_names, args)), **kw)
    bound = [bound_of(c, kw, args[0].element_size(), combo[2]) for c in kernel.configs]
    chosen = []
    if full:
        chosen = kernel.configs
    elif combo in DEFAULT_COMBOS:
        firsts = []  # keywords of the first launch of each of this kernel's constexpr branches
        for k, _, k_kw in launches:
            if k is kernel and all(k_kw != f for f in firsts):
                firsts.append(k_kw)
        if firsts[DEFAULT_COMBOS.index(combo) % len(firsts)] is kw:
            chosen = [max(kept, key=lambda c: bound[kernel.configs.index(c)])]
    for config, b in zip(kernel.configs, bound):
        rec = dict(kernel=kernel.fn.__name__, precision=kw["PRECISION"], cc=combo[2],
                   config=str(config), branch={k: v for k, v in kw.items() if k.isupper()},
                   kept=any(c is config for c in kept), bound=b)
        job = (combo[2], kernel, args, kw, config) if any(c is config for c in chosen) else None
        yield rec, job


def compile_into(rec, job):
    """Compile job; add its shared memory (or the error) and seconds to rec."""
    t0 = time.time()
    try:
        rec["shared"] = compile_for(*job).metadata.shared
    except Exception as e:  # noqa: BLE001 -- the test reports it
        rec["error"] = f"{type(e).__name__}: {str(e)[-2000:]}"
    rec["seconds"] = round(time.time() - t0, 2)


# ----------------------------------------------------------------------------- tests
@pytest.fixture(scope="module", params=[
    "default", pytest.param("full", marks=pytest.mark.skipif(
        not FULL, reason="the full sweep takes hours on 2 cores: TAGALIGN_FULL_COMPILE=1"))])
def compiled(request, tmp_path_factory):
    """The worker's records, one per (launch, GPU, config)."""
    out = tmp_path_factory.mktemp("compile") / "records.jsonl"
    env = dict(os.environ, TRITON_INTERPRET="0")
    cmd = [sys.executable, os.path.abspath(__file__), str(out)]
    full = request.param == "full"
    proc = subprocess.run(cmd + (["--full"] if full else []), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=None if full else 1800)
    if proc.returncode == UNAVAILABLE:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


def where(r):
    return (f"{r['kernel']} sm_{r['cc']} D={r['D']} {r['dtype']}/{r['precision']} "
            f"{r['branch']} [{r['config']}]")


def test_kernels_compile_for_sm80_and_sm90(compiled):
    failed = [f"{where(r)}: {r['error']}" for r in compiled if "error" in r]
    assert not failed, f"{len(failed)} compiles failed:\n" + "\n".join(failed[:5])
    assert any("shared" in r for r in compiled)


def test_configs_a_gpu_may_pick_fit_its_shared_memory(compiled):
    over = [f"{where(r)}: {r['shared']} > {GPUS[r['cc']]} bytes" for r in compiled
            if r["kept"] and r.get("shared", 0) > GPUS[r["cc"]]]
    assert not over, "\n".join(over)


def test_shared_memory_bound_holds(compiled):
    # shared_memory_bound must not understate: a config it keeps could then fail at launch
    under = [f"{where(r)}: bound {r['bound']} < {r['shared']} bytes" for r in compiled
             if r.get("shared", 0) > r["bound"]]
    assert not under, "\n".join(under)


def test_every_launch_keeps_a_config_that_fits(compiled):
    # else the prune falls back to its smallest config, and triton may refuse the launch
    launches = {}
    for r in compiled:
        key = where(r).split(" [")[0]
        launches[key] = launches.get(key, False) or (r["kept"] and r["bound"] <= GPUS[r["cc"]])
    empty = [k for k, ok in launches.items() if not ok]
    assert not empty, "\n".join(empty)


if __name__ == "__main__":
    main(sys.argv[1], "--full" in sys.argv)
