"""Checkpoint protocol: who seals which file, cheap vs checksum verification, safe pruning, old manifests,
agreeing on a resume point; and a 2-rank save with a real DeepSpeed engine (slow).

Run as a script (`deepspeed --num_gpus 2 tests/test_checkpoint.py --worker OUT MODEL`) it is the slow
test's worker."""

import hashlib
import json
import os
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rft_ds import checkpoint as C  # noqa: E402
from rft_ds.checkpoint import CheckpointError  # noqa: E402

SHARDS = {
    r: [
        f"ds/zero_pp_rank_{r}_mp_rank_00_model_states.pt",
        f"ds/zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
        f"rank{r}.pt",
    ]
    for r in range(2)
}
SHARED = ["zero_to_fp32.py", "hf/config.json", "meta.json", "rft_state.pt"]


def _files(d: Path, epoch: int, world: int = 2, extra: tuple[str, ...] = ()) -> None:
    for rel in [f for r in range(world) for f in SHARDS.get(r, [])] + SHARED + list(extra):
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(2048 + 512 * len(rel)))
    (d / "meta.json").write_text(json.dumps({"epoch": epoch, "world_size": world, "format": C.STATE_FORMAT}))


def sealed_checkpoint(root: Path, epoch: int, world: int = 2, latest: bool = True) -> Path:
    """A checkpoint sealed the way `save` does it: each rank its own files, then rank 0 the rest."""
    tmp = root / f".tmp-epoch_{epoch:05d}"
    _files(tmp, epoch, world)
    claims = [(C.HASH, C.seal(tmp, C.rank_files(tmp, r, world), r)) for r in range(world)]
    files = C.cover(tmp, claims)
    C._fsync_dirs(tmp)
    C._write_manifest_file(tmp, files, C.HASH, world)
    final = root / f"epoch_{epoch:05d}"
    tmp.rename(final)
    if latest:
        (root / "latest").write_text(final.name)
    return final


def old_checkpoint(root: Path, epoch: int, world: int = 2) -> Path:
    """A checkpoint as rft_ds wrote them before manifests had owners: {"files": {path: {size, blake2b}}}."""
    d = root / f"epoch_{epoch:05d}"
    _files(d, epoch, world)
    files = {}
    for p in sorted(d.rglob("*")):
        if p.is_file():
            files[p.relative_to(d).as_posix()] = {
                "size": p.stat().st_size,
                "blake2b": hashlib.blake2b(p.read_bytes(), digest_size=16).hexdigest(),
            }
    (d / "manifest.json").write_text(json.dumps({"files": files}, indent=1))
    (root / "latest").write_text(d.name)
    return d


def flip_byte(p: Path, at: int = 100) -> None:
    data = bytearray(p.read_bytes())
    data[at] ^= 0xFF
    p.write_bytes(bytes(data))


# ---- who seals what ---------------------------------------------------------------------------------


def test_each_rank_owns_its_shards_and_rank0_everything_else(tmp_path):
    c = sealed_checkpoint(tmp_path, 1)
    m = json.loads((c / "manifest.json").read_text())
    assert m["hash"] == C.HASH == "xxh3_128" and m["world_size"] == 2 and m["format"] == 2
    on_disk = sorted(p.relative_to(c).as_posix() for p in c.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert sorted(m["files"]) == on_disk  # every file, exactly once
    owners = {rel: e["rank"] for rel, e in m["files"].items()}
    assert sorted(r for r, o in owners.items() if o == 1) == sorted(SHARDS[1])
    assert sorted(r for r, o in owners.items() if o == 0) == sorted(SHARDS[0] + SHARED)
    man = C.read_manifest(c)
    assert sorted(man.owned_by(1, 2)) == sorted(SHARDS[1])  # resume verification splits the same way
    assert C.rank_of_file("ds/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", 2) == 1
    assert C.rank_of_file("ds/zero_pp_rank_3_mp_rank_00_model_states.pt", 2) is None  # no such rank: rank 0's
    assert C.rank_of_file("rft_state.pt", 2) is None


def test_unclaimed_files_are_sealed_by_rank0_and_bad_claims_fail(tmp_path):
    d = tmp_path / "ck"
    _files(d, 1, extra=("ds/something_new.bin", "rank7.pt"))  # names no rank of 2 claims
    claims = [(C.HASH, C.seal(d, C.rank_files(d, r, 2), r)) for r in range(2)]
    files = C.cover(d, claims)
    assert files["ds/something_new.bin"]["rank"] == 0 and files["rank7.pt"]["rank"] == 0
    assert files["rank1.pt"]["rank"] == 1
    twice = [claims[0], (C.HASH, {**claims[1][1], "rank0.pt": claims[0][1]["rank0.pt"]})]
    with pytest.raises(RuntimeError, match="rank0.pt was claimed by ranks 0 and 1"):
        C.cover(d, twice)
    (d / "rank1.pt").unlink()
    with pytest.raises(RuntimeError, match="rank 1 sealed rank1.pt, which rank 0 does not see"):
        C.cover(d, claims)


# ---- cheap check and checksum check -------------------------------------------------------------------


def test_cheap_check_catches_truncation_and_missing_manifest_without_reading(tmp_path):
    root = tmp_path / "checkpoints"
    c = sealed_checkpoint(root, 1)
    assert C.check_complete(c) is None and C.verify(c) is None
    flip_byte(c / SHARDS[1][1])  # same size: the cheap check cannot see it, by design
    assert C.check_complete(c) is None
    assert C.resolve_resume("auto", tmp_path, 2) == c  # no checksums before the process group
    assert C.verify(c) == f"{SHARDS[1][1]} fails its checksum"
    shard = c / SHARDS[0][0]
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:100])  # torn
    assert C.check_complete(c) == f"{SHARDS[0][0]} is 100 bytes, manifest says {size}"
    (c / "manifest.json").unlink()
    assert C.check_complete(c) == "no manifest (incomplete write)"
    d = sealed_checkpoint(root, 2)
    (d / "manifest.json").write_text("{not json")
    assert C.check_complete(d).startswith("unreadable manifest")


def test_checksum_check_is_split_by_owner(tmp_path):
    c = sealed_checkpoint(tmp_path, 1)
    flip_byte(c / SHARDS[1][1])  # rank 1's optimizer shard, one bit, same size
    assert C.verify_files(c, 0, 2) is None  # rank 0 never reads rank 1's files
    assert C.verify_files(c, 1, 2) == f"{SHARDS[1][1]} fails its checksum"
    assert C.verify_files(c) == f"{SHARDS[1][1]} fails its checksum"  # one process: everything
    flip_byte(c / "rft_state.pt")
    assert C.verify_files(c, 0, 2) == "rft_state.pt fails its checksum"


def test_old_blake2b_manifests_still_verify(tmp_path):
    root = tmp_path / "checkpoints"
    c = old_checkpoint(root, 3)
    assert C.read_manifest(c).hash_name == "blake2b"
    assert C.verify(c) is None and C.resolve_resume("auto", tmp_path, 2) == c
    m = C.read_manifest(c)
    a, b = m.owned_by(0, 2), m.owned_by(1, 2)  # no owners recorded: split round-robin, all covered once
    assert sorted(a + b) == sorted(m.files) and not set(a) & set(b) and a and b
    assert C.agree_on_resume("auto", tmp_path, 2) == c
    flip_byte(c / "rft_state.pt")
    assert C.verify(c) == "rft_state.pt fails its checksum"
    assert sum(C.verify_files(c, r, 2) is not None for r in range(2)) == 1


# ---- resume ---------------------------------------------------------------------------------------------


def test_agree_on_resume_falls_back_or_fails_in_one_line(tmp_path):
    root = tmp_path / "checkpoints"
    c1, c2 = sealed_checkpoint(root, 1), sealed_checkpoint(root, 2)
    (root / "epoch_00003").mkdir()  # not a checkpoint (no manifest): skipped, with a warning, when looked at
    assert C.agree_on_resume(None, tmp_path, 2) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert C.agree_on_resume("auto", tmp_path, 2) == c2  # `latest` names an intact one: nothing else is read
    flip_byte(c2 / SHARDS[0][1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert C.agree_on_resume("auto", tmp_path, 2) == c1
    said = [str(w.message) for w in caught]
    assert said == [
        f"rft_ds: skipping checkpoint {c2}: ds/zero_pp_rank_0_mp_rank_00_optim_states.pt fails its checksum "
        f"(found by rank 0); falling back to the previous complete checkpoint",
        f"rft_ds: skipping checkpoint {root / 'epoch_00003'}: no manifest (incomplete write); falling back "
        f"to the previous complete checkpoint",
    ]
    with pytest.raises(CheckpointError) as e:
        C.agree_on_resume(str(c2), tmp_path, 2)
    assert str(e.value) == (
        f"--resume {c2}: not a complete rft_ds checkpoint: ds/zero_pp_rank_0_mp_rank_00_optim_states.pt "
        f"fails its checksum (found by rank 0)"
    )
    with pytest.raises(
        CheckpointError, match="taken inside a sampling, scoring or training stage by 2 ranks; this run has 4"
    ):
        C.agree_on_resume(str(c1), tmp_path, 4)  # these fixtures say no position: taken mid-stage
    with pytest.warns(UserWarning, match="skipping checkpoint .*epoch_00001: checkpoint .* by 2 ranks; this run has 4"):
        assert C.agree_on_resume("auto", tmp_path, 4) is None  # auto: none this world size can continue from
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        C.agree_on_resume(str(tmp_path / "nope"), tmp_path, 2)
    flip_byte(c1 / "meta.json", at=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert C.agree_on_resume("auto", tmp_path, 2) is None
    assert "unreadable meta.json" in str(caught[-2].message)
    assert str(caught[-1].message) == f"rft_ds: no intact checkpoint in {root}: starting fresh"


# ---- pruning ------------------------------------------------------------------------------------------


def test_prune_keeps_latest_new_incomplete_and_foreign_dirs(tmp_path):
    root = tmp_path / "checkpoints"
    cs = {e: sealed_checkpoint(root, e, latest=False) for e in (1, 2, 3, 4, 5, 7)}
    (root / "latest").write_text("epoch_00002")  # e.g. a resume fell back to it
    torn = root / "epoch_00000"
    torn.mkdir()  # no manifest: incomplete
    damaged = cs[3]
    (damaged / SHARDS[1][0]).write_bytes(b"short")  # sizes do not match: incomplete
    foreign = root / "epoch_notes"
    foreign.mkdir()
    removed = C.prune(root, 2, cs[5])
    # complete up to epoch 5, newest first: 5, 4, 2, 1; keep 2 -> 5, 4; 2 is `latest`'s; so only 1 goes
    assert removed == [cs[1]]
    left = sorted(p.name for p in root.iterdir())
    assert left == [
        "epoch_00000",
        "epoch_00002",
        "epoch_00003",
        "epoch_00004",
        "epoch_00005",
        "epoch_00007",
        "epoch_notes",
        "latest",
    ]  # 7: a later epoch (abandoned run) is not counted or removed
    assert C.prune(root, 1, cs[5]) == [cs[4]]
    assert C.prune(root, 1, cs[5]) == []  # never the new one, never latest's


# ---- save, one process, fake engine -----------------------------------------------------------------


class _Cfg:
    def save_pretrained(self, d):
        Path(d).mkdir(parents=True, exist_ok=True)
        (Path(d) / "config.json").write_text("{}")


class _Engine:
    """What save() needs of a DeepSpeed engine: it writes ZeRO-3-named shard files like DeepSpeed does."""

    module = type("M", (), {"config": _Cfg(), "generation_config": None})()

    def save_checkpoint(self, save_dir, tag, save_latest, exclude_frozen_parameters=False):
        d = Path(save_dir) / tag
        d.mkdir(parents=True)
        (d / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(os.urandom(3000))
        (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(os.urandom(50000))
        (Path(save_dir) / "zero_to_fp32.py").write_text("# script")


def test_save_one_process_finalize_state_and_keep_last(tmp_path):
    import torch

    root = tmp_path / "checkpoints"
    seen = []

    def finalize(elapsed):
        seen.append(elapsed)
        return {"epoch": len(seen), "history": [{"time_checkpoint": elapsed}]}

    for epoch in range(4):
        saved = C.save(
            root, C.checkpoint_name(epoch + 1), _Engine(), None, _Cfg(), keep_last=2, finalize_state=finalize
        )
        assert saved.path == root / f"epoch_{epoch:05d}" and C.verify(saved.path) is None
    assert sorted(p.name for p in root.iterdir()) == ["epoch_00002", "epoch_00003", "latest"]
    assert (root / "latest").read_text() == "epoch_00003"
    state = torch.load(root / "epoch_00003" / "rft_state.pt", weights_only=False)
    assert state["history"][-1]["time_checkpoint"] == seen[-1] > 0
    assert 0 < saved.shards_seconds <= saved.seconds and saved.own_bytes == saved.shard_bytes > 53000
    m = json.loads((saved.path / "manifest.json").read_text())
    assert {e["rank"] for e in m["files"].values()} == {0} and "zero_to_fp32.py" in m["files"]
    # without finalize_state: `state` is saved as given
    C.save(root, C.checkpoint_name(5), _Engine(), {"epoch": 4}, _Cfg(), keep_last=2)
    assert torch.load(root / "epoch_00004" / "rft_state.pt", weights_only=False) == {"epoch": 4}


# ---- slow: 2 ranks, a real DeepSpeed engine ------------------------------------------------------------


def _worker(out: Path, model: Path) -> None:
    import torch
    from transformers import AutoTokenizer

    from rft_ds import distributed as D
    from rft_ds.config import TrainConfig
    from rft_ds.learner import Learner, fill_ds_config, load_ds_config

    D.init("gloo", 300)
    rank, world = D.rank(), D.world_size()
    ds = fill_ds_config(
        load_ds_config(ROOT / "ds_configs" / "zero3_cpu.json"),
        TrainConfig(micro_batch_size=2, learning_rate=1e-3),
        world,
    )
    learner = Learner(str(model), ds)
    tok = AutoTokenizer.from_pretrained(model)
    root = out / "checkpoints"
    res: dict = {"saved": []}
    for epoch in range(2):
        s = C.save(
            root,
            C.checkpoint_name(epoch + 1),
            learner.engine,
            None,
            tok,
            keep_last=3,
            finalize_state=lambda t, e=epoch: {"epoch": e, "time_checkpoint": t},
        )
        res["saved"].append(
            {
                "own_bytes": s.own_bytes,
                "shard_bytes": s.shard_bytes,
                "seconds": s.seconds,
                "shards_seconds": s.shards_seconds,
            }
        )
    c1 = root / "epoch_00001"
    res["cheap"] = str(C.resolve_resume("auto", out, world))
    D.barrier()
    if rank == 1:  # corrupt one byte of rank 1's own optimizer shard, size unchanged
        flip_byte(c1 / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt", at=5000)
    D.barrier()
    res["cheap_after"] = str(C.resolve_resume("auto", out, world))  # cannot see it: same size
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res["auto"] = str(C.agree_on_resume("auto", out, world))
    res["warnings"] = [str(w.message) for w in caught]
    try:
        C.agree_on_resume(str(c1), out, world)
        res["explicit"] = None
    except CheckpointError as e:
        res["explicit"] = str(e)
    try:
        C.load(c1, learner.engine)  # not verified beforehand: load checks, and every rank refuses
        res["load"] = None
    except CheckpointError as e:
        res["load"] = str(e)
    state, _ = C.load(Path(res["auto"]), learner.engine, verified=True)
    res["loaded_epoch"] = state["epoch"]
    res["rng_ok"] = (
        (torch.get_rng_state() == torch.load(Path(res["auto"]) / f"rank{rank}.pt", weights_only=False)["rng"]["torch"])
        .all()
        .item()
    )
    (out / f"rank{rank}.json").write_text(json.dumps(res))
    D.barrier()


@pytest.mark.slow
def test_two_ranks_seal_their_own_shards_and_agree_on_resume(tmp_path, tiny_model):
    out = tmp_path / "run"
    out.mkdir()
    from tests.ranks import run_ranks

    p = run_ranks(2, ["tests/test_checkpoint.py", "--worker", str(out), str(tiny_model)], timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    c0, c1 = out / "checkpoints" / "epoch_00000", out / "checkpoints" / "epoch_00001"

    # the manifest says who sealed what: rank 1 exactly its ZeRO-3 shards and its RNG state
    m = json.loads((c0 / "manifest.json").read_text())
    assert m["hash"] == "xxh3_128" and m["world_size"] == 2
    on_disk = sorted(p.relative_to(c0).as_posix() for p in c0.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert sorted(m["files"]) == on_disk
    own = {r: sorted(rel for rel, e in m["files"].items() if e["rank"] == r) for r in range(2)}
    assert own[1] == [
        "ds/zero_pp_rank_1_mp_rank_00_model_states.pt",
        "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "rank1.pt",
    ]
    assert {
        "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "rank0.pt",
        "rft_state.pt",
        "meta.json",
        "zero_to_fp32.py",
    } <= set(own[0])
    for r in range(2):  # each rank checksummed only its own files (the bytes it reported are exactly those)
        mine = sum(m["files"][rel]["size"] for rel in own[r] if C.rank_of_file(rel, 2) == r)
        assert res[r]["saved"][0]["own_bytes"] == mine
    assert res[0]["saved"][0]["shard_bytes"] == res[1]["saved"][0]["shard_bytes"]
    import torch

    assert torch.load(c1 / "rft_state.pt", weights_only=False)["time_checkpoint"] == pytest.approx(
        res[0]["saved"][1]["shards_seconds"]
    )

    # the cheap pre-process-group check cannot see a flipped byte; the agreed, checksummed one can
    assert res[0]["cheap"] == res[0]["cheap_after"] == str(c1)
    assert res[0]["auto"] == res[1]["auto"] == str(c0)  # both ranks fall back to the same one
    fallback = [w for w in res[0]["warnings"] if "skipping checkpoint" in w]
    assert (
        len(fallback) == 1
        and "zero_pp_rank_1_mp_rank_00_optim_states.pt fails its checksum (found by rank 1)" in fallback[0]
        and "falling back" in fallback[0]
    ), res[0]["warnings"]
    for r in range(2):
        e = res[r]["explicit"]
        assert (
            e == res[0]["explicit"]
            and "\n" not in e
            and e.startswith(f"--resume {c1}: not a complete rft_ds checkpoint")
        )
        assert "found by rank 1" in e
        assert res[r]["load"] is not None and "found by rank 1" in res[r]["load"]
        assert res[r]["loaded_epoch"] == 0 and res[r]["rng_ok"]


if __name__ == "__main__" and "--worker" in sys.argv:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    i = args.index("--worker")
    _worker(Path(args[i + 1]), Path(args[i + 2]))
