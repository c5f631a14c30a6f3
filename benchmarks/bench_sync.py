"""ZeRO-3 -> vLLM weight sync, 2 CPU ranks: bandwidth against a plain memcpy of the same bytes, peak extra
memory against bucket size, and sync time against model size.

    python benchmarks/bench_sync.py --shape tiny small medium smol --bucket-mb 1 16 64 256
"""

import argparse
import sys
import time

import common


def worker(shape: str, buckets: list[float], out: str) -> None:
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from rft_ds import distributed as D
    from rft_ds.learner import Learner
    from rft_ds.sampling.vllm import VLLMSampler
    from rft_ds.weight_sync import SyncStats, WeightSync

    D.init("gloo", 3600)
    rank = D.rank()
    path = common.model_dir(shape)
    tok = AutoTokenizer.from_pretrained(path)
    learner = Learner(str(path), common.ds_config(D.world_size()))
    sampler = VLLMSampler(str(path), tok, seed=rank, dtype="float32", max_model_len=128)
    total = sum(int(p.ds_numel) * 4 for p in learner.module.parameters())

    # memcpy baseline: the same number of bytes, one plain copy, on each rank at the same time
    src, dst = torch.ones(total // 4), torch.empty(total // 4)
    dst.copy_(src)
    D.barrier()
    t = time.perf_counter()
    for _ in range(3):
        dst.copy_(src)
    memcpy_s = (time.perf_counter() - t) / 3
    del src, dst

    rows = []
    for mb in buckets:
        sync = WeightSync(learner.module, sampler, mb, torch.float32)
        sync.sync()  # warm-up
        D.barrier()
        times = []
        for _ in range(3):
            st = sync.sync()
            times.append(st.seconds)
        sec = torch.tensor([min(times)])
        dist.all_reduce(sec, op=dist.ReduceOp.MAX)
        # the same stream drained without vLLM: what the ZeRO-3 gathers + copies cost on their own
        D.barrier()
        t = time.perf_counter()
        for _ in sync._weights(SyncStats()):
            pass
        gather = torch.tensor([time.perf_counter() - t])
        dist.all_reduce(gather, op=dist.ReduceOp.MAX)
        r = {
            "shape": shape,
            "model_bytes": total,
            "bucket_mb": mb,
            "n_buckets": st.n_buckets,
            "sync_s": float(sec),
            "sync_bytes_per_s": total / float(sec),
            "memcpy_s": memcpy_s,
            "memcpy_bytes_per_s": total / memcpy_s,
            "sync_over_memcpy": memcpy_s / float(sec),
            "gather_copy_s": float(gather),
            "engine_load_s": float(sec) - float(gather),
            "peak_extra_bytes": st.peak_extra_bytes,
            "peak_over_bucket": st.peak_extra_bytes / (mb * 2**20),
            "peak_over_model": st.peak_extra_bytes / total,
        }
        rows.append(r)
        if rank == 0:
            print(
                f"[bench] {shape} ({total / 2**20:.1f} MiB) bucket {mb:g} MiB: sync {r['sync_s'] * 1e3:.1f} ms "
                f"= {r['sync_bytes_per_s'] / 2**30:.2f} GiB/s, memcpy {r['memcpy_bytes_per_s'] / 2**30:.2f} GiB/s, "
                f"ratio {r['sync_over_memcpy']:.2f} (gather+copy {r['gather_copy_s'] * 1e3:.0f} ms, vLLM load "
                f"{r['engine_load_s'] * 1e3:.0f} ms); peak extra {st.peak_extra_bytes / 2**20:.1f} MiB "
                f"({r['peak_over_model']:.2f} of the model)",
                flush=True,
            )
    common.append_rows(out, rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", nargs="+", default=["tiny", "small", "medium", "smol"], choices=sorted(common.SHAPES))
    ap.add_argument("--bucket-mb", nargs="+", type=float, default=[1, 16, 64, 256])
    ap.add_argument("--out", default=str(common.ROOT / "benchmarks" / "sync.jsonl"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.shape[0], args.bucket_mb, args.out)
        return
    for shape in args.shape:
        common.model_dir(shape)
        common.launch(
            "benchmarks/bench_sync.py",
            "--worker",
            "--shape",
            shape,
            "--bucket-mb",
            *map(str, args.bucket_mb),
            "--out",
            args.out,
        )


if __name__ == "__main__":
    sys.exit(main())
