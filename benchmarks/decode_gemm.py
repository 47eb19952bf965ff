"""GEMMs at decoder sizes: oneDNN's torch._int_mm against turboserve's kernel on packed weights
(kernels.c `int8_gemm_packed`: VNNI dot products, or int16 multiply-adds on CPUs with AVX2 and no
VNNI), on GPT-2 small's weight shapes, same run, same inputs, with fp32 torch.mm on the same shape as
the rate int8 has to beat, and, where fp32 linears take it (AVX2 without AVX-512), turboserve's fp32
kernel (`f32_gemm_packed`) against that torch.mm; for the LM head both fp32 columns multiply by the
weight as a decoder holds it, [vocab, hidden] (the tied embedding): `x @ w.t()` and `f32_gemm_nt`.

    .venv/bin/python benchmarks/decode_gemm.py [--rows 1,4,16,32,64,128,512] [--threads 2] [--shapes "lm head"]

Prints per shape and row count the time of each (best of 30), the weight bytes read per second and
the multiply-add rate (GOP/s, 2 operations each), and checks the two int8 ones give the same int32
results (both are exact) and the fp32 ones agree (max error relative to the largest |result|). `--cold N` cycles through N copies
of each weight per timed call, so the weights come from memory as in a decode step, not from cache
(the LM head is skipped there: N copies of it do not fit the budget of a quick run; the fp32 column
stays one warm copy). Which of the two int8 kernels a decoder takes at which row count is measured at
load on the machine (ops/cpu.py tune_int8_rows); this table shows the whole picture for GPT-2's shapes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from encoder import timed  # noqa: E402

from encoder import machine  # noqa: E402

from turboserve import native  # noqa: E402
from turboserve.ops.cpu import pack_panels, pack_vnni  # noqa: E402

SHAPES = {"qkv 768x2304": (768, 2304), "o 768x768": (768, 768), "fc1 768x3072": (768, 3072),
          "fc2 3072x768": (3072, 768), "lm head 768x50257": (768, 50257)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,4,16,32,64,128,512")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cold", type=int, default=0, help="cycle through this many copies of each weight")
    ap.add_argument("--shapes", default="", help="comma list of shape name prefixes to run (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    copies = max(1, args.cold)
    if native.lib() is None:
        raise SystemExit("the native kernels are not built (no C compiler)")
    kernel = "int16 madd (AVX2)" if native.int8_gemm_everywhere() else "VNNI" if native.has_vnni() else "scalar"
    print(f"# machine: {machine()}; native kernel: {kernel}")
    print(f"# {args.threads} threads; time per call (best of 30; --cold: best of 5 over {copies} weight copies), "
          "weight GB/s and GOP/s in brackets")
    f32 = native.f32_gemm_native()
    print("| shape | rows | torch._int_mm | native packed | fp32 torch.mm |" + (" native fp32 | fp32 error |" if f32 else "")
          + " same int8 result |")
    print("|---|---:|---:|---:|---:|" + ("---:|---:|" if f32 else "") + "---|")
    g = torch.Generator().manual_seed(0)
    for name, (k, n) in SHAPES.items():
        if args.cold and "lm head" in name or args.shapes and not any(name.startswith(p) for p in args.shapes.split(",")):
            continue
        ws = [torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=g) for _ in range(copies)]
        packs = [pack_vnni(w) for w in ws]
        w, (packed, colsum) = ws[0], packs[0]
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
            out = torch.empty(m, n, dtype=torch.int32)
            ref = torch._int_mm(x, w)

            def run_ref():
                for wi in ws:
                    torch._int_mm(x, wi)

            def run_new():
                for p, c in packs:
                    native.int8_gemm_packed(x, p, c, n, out)
            xf, wf = x.float(), w.float()
            head = "lm head" in name
            wv = wf.t().contiguous() if head else None                 # [vocab, hidden], as decoders hold it
            gbs, gop = k * n / 1e9, 2 * m * k * n / 1e9

            def cell(t, nbytes):
                return f"{t * 1e3:.3f} ms ({nbytes / t:.0f} GB/s, {gop / t:.0f} GOP/s)"
            t_ref = timed(run_ref, 5 if args.cold else 30) / copies
            t_new = timed(run_new, 5 if args.cold else 30) / copies
            t_fp = timed((lambda: xf @ wv.t()) if head else (lambda: torch.mm(xf, wf)), 5 if args.cold else 30)
            f32_cells = ""
            if f32:
                panels, fout = (None if head else pack_panels(wf)), torch.empty(m, n)
                t_f32 = timed((lambda: native.f32_gemm_nt(xf, wv, fout)) if head else
                              (lambda: native.f32_gemm_packed(xf, panels, None, n, fout)), 5 if args.cold else 30)
                ref_f = torch.mm(xf, wf)
                err = ((fout - ref_f).abs().max() / ref_f.abs().max()).item()
                f32_cells = f" {cell(t_f32, 4 * gbs)} | {err:.1e} |"
            native.int8_gemm_packed(x, packed, colsum, n, out)
            same = torch.equal(out, ref)
            print(f"| {name} | {m} | {cell(t_ref, gbs)} | {cell(t_new, gbs)} | {cell(t_fp, 4 * gbs)} |{f32_cells}"
                  f" {'yes' if same else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
