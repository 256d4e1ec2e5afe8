"""Device time per call (fp32) of a copy, the raw op fastnorm::normalize_advantages, fastnorm.normalize_advantages
and the eager formula + diagnostics: loops over inputs rotated through >= 256 MB, and graph replay of 20 calls
(medians of 7). Run by bench/cuda_advantages_device_time.sh on a GPU machine."""
import statistics
import sys

import torch

sys.path.insert(0, ".")
import fastnorm  # noqa: E402
from bench.advantages import eager_step  # noqa: E402

dev = torch.device("cuda")


def timed(fn, calls):
    t = []
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(7):
        a.record()
        for i in range(calls):
            fn(i)
        b.record()
        b.synchronize()
        t.append(a.elapsed_time(b) * 1000 / calls)
    return statistics.median(t)


def graph_us(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(3):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(20):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    return timed(lambda i: g.replay(), 10) / 20


CASES = [("global", 1 << 20), ("masked rows", 1 << 20), ("per agent", 1 << 20),
         ("global", 1 << 24), ("masked rows", 1 << 24), ("per agent", 1 << 24)]
print(f"{'case':18s} {'impl':14s} {'loop us':>8s} {'graph us':>8s} {'of copy L':>9s} {'of copy G':>9s} "
      f"{'vs eager L':>10s} {'vs eager G':>10s}")
for layout, n in CASES:
    shape = (n // 16, 16)
    dim = 0 if layout == "per agent" else None
    R = max(4, (256 << 20) // (8 * n))
    xs = [torch.randn(shape, device=dev) * 2 + 0.5 for _ in range(R)]
    ys = [torch.empty_like(x) for x in xs]
    ms = [torch.rand(shape[0], device=dev) < 0.8 for _ in range(R)] if layout == "masked rows" else [None] * R
    G = 16 if dim == 0 else 1
    O, I = (shape[0], 1) if dim == 0 else (1, n)
    stats = torch.empty(4, G, dtype=torch.float64, device=dev)
    flat = [m.reshape(-1) if m is not None else None for m in ms]
    impls = {
        "copy": lambda i: ys[i % R].copy_(xs[i % R]),
        "raw op": lambda i: torch.ops.fastnorm.normalize_advantages(xs[i % R].view(O, G, I), flat[i % R],
                                                                     ys[i % R].view(O, G, I), stats, 1e-4, True),
        "fastnorm": lambda i: fastnorm.normalize_advantages(xs[i % R], mask=ms[i % R], dim=dim, backend="cuda"),
        "eager": lambda i: eager_step(xs[i % R], dim, ms[i % R]),
    }
    res = {}
    for name, fn in impls.items():
        for i in range(R):
            fn(i)
        torch.cuda.synchronize()
        loop = timed(fn, max(R, 64))
        try:
            graph = graph_us(fn) if not (name == "eager" and ms[0] is not None) else float("nan")
        except Exception as e:  # noqa: BLE001
            print("graph failed", name, type(e).__name__, str(e)[:100])
            graph = float("nan")
        res[name] = (loop, graph)
    for name, (loop, graph) in res.items():
        cl, cg = res["copy"]
        el, eg = res["eager"]
        print(f"{layout + ' ' + str(n >> 20) + 'M':18s} {name:14s} {loop:8.2f} {graph:8.2f} {cl / loop:9.3f} "
              f"{cg / graph:9.3f} {el / loop:10.2f} {eg / graph:10.2f}")
    # correctness against float64
    x, m = xs[0], ms[0]
    y, st = fastnorm.normalize_advantages(x, mask=m, dim=dim, backend="cuda")
    y_ref, st_ref = fastnorm.normalize_advantages(x.cpu(), mask=None if m is None else m.cpu(), dim=dim,
                                                  backend="reference")
    print("  max |y - ref|", float((y.cpu() - y_ref).abs().max()), " std rel err",
          float(((st.std_raw.cpu() - st_ref.std_raw) / st_ref.std_raw).abs().max()))
    del xs, ys, ms, flat
    torch.cuda.empty_cache()
