"""The fake cuda:0 of tests/fake_cuda.py: GPU-only device mistakes must raise on CPU, correct code must not."""

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from tests.fake_cuda import CUDA0, FakeCuda, fake_cuda, is_fake_cuda

SAME_DEVICE = "Expected all tensors to be on the same device"
NUMPY = "can't convert cuda:0 device type tensor to numpy"


# ------------------------------------------------------------------------------------- a real HF model
@pytest.fixture(scope="module")
def llama():
    """A tiny HF Llama and its plain-CPU answers (logits, greedy tokens, one training step), computed outside
    the fake."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(1, 64, (2, 7))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0  # left padding: the attention-mask path matters
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        greedy = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    return model, ids, mask, logits, greedy


def test_llama_forward_on_device_matches_cpu(llama):
    model, ids, mask, ref, _ = llama
    with fake_cuda(), torch.no_grad():
        model.to("cuda")
        assert model.device == CUDA0 and all(p.is_cuda for p in model.parameters())
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
        assert logits.device == CUDA0
        assert torch.allclose(logits.cpu(), ref, rtol=0, atol=1e-6)
        assert isinstance(logits.cpu().numpy(), np.ndarray)
        with pytest.raises(TypeError, match=NUMPY):
            logits.numpy()
        assert isinstance(logits[0, 0, 0].item(), float) and len(logits.tolist()) == 2  # these sync, as on CUDA


def test_llama_forward_with_cpu_input_ids_raises(llama):
    model, ids, mask, _, _ = llama
    with fake_cuda(), torch.no_grad():
        model.to("cuda")
        with pytest.raises(RuntimeError, match=SAME_DEVICE):
            model(input_ids=ids, attention_mask=mask)


def test_llama_generate_on_device_matches_cpu(llama):
    model, ids, mask, _, greedy = llama
    with fake_cuda(), torch.no_grad():
        model.to("cuda")
        out = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=0,
        )
        assert out.device == CUDA0
        assert torch.equal(out.cpu(), greedy)


def test_llama_generate_with_cpu_attention_mask_raises(llama):
    """input_ids on the GPU but the mask left on CPU: generate derives position_ids from the mask on CPU
    and never moves them (it only realigns inputs when input_ids are off-device), so rotary embedding
    multiplies a CPU tensor by a CUDA one, which fails on a GPU."""
    model, ids, mask, _, _ = llama
    with fake_cuda(), torch.no_grad():
        model.to("cuda")
        with pytest.raises(RuntimeError, match=SAME_DEVICE):
            model.generate(
                input_ids=ids.to("cuda"), attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0
            )


def test_llama_generate_with_cpu_inputs_behaves_like_cuda(llama):
    """transformers 5.x generate deliberately copies CPU inputs to the model's device before each forward and
    keeps its loop on input_ids' device, so on a real GPU this works (with a warning): the fake must agree,
    not invent an error."""
    model, ids, mask, _, greedy = llama
    with fake_cuda(), torch.no_grad():
        model.to("cuda")
        with pytest.warns(UserWarning, match="different than your model's device"):
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert out.device == torch.device("cpu") and torch.equal(out, greedy)


def test_llama_training_step_matches_cpu(llama):
    """backward, clip_grad_norm_ and AdamW (which takes its foreach path for cuda params) on the fake."""
    model = copy.deepcopy(llama[0]).train()
    ids = llama[1]

    def step(m, x):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        loss = m(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        return loss.item()

    ref = copy.deepcopy(model)
    ref_loss = step(ref, ids)
    with fake_cuda():
        model.cuda()
        loss = step(model, ids.cuda())
        assert all(p.grad.device == CUDA0 for p in model.parameters())
        assert loss == pytest.approx(ref_loss, abs=1e-6)
        for p, q in zip(model.parameters(), ref.parameters()):
            assert torch.allclose(p.cpu(), q, atol=1e-6)
        assert model(input_ids=ids.cuda(), labels=ids).loss.is_cuda  # HF's loss moves labels itself, as on a GPU


# ----------------------------------------------------------------------------- factories and devices
CUDA_SPELLINGS = {
    "str": "cuda",
    "str:0": "cuda:0",
    "device": torch.device("cuda"),
    "device:0": torch.device("cuda", 0),
    "int": 0,
}


@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")  # torch.tensor(tensor): torch warns, CUDA or not
@pytest.mark.parametrize("dev", CUDA_SPELLINGS.values(), ids=CUDA_SPELLINGS.keys())
def test_factories_with_a_cuda_device_are_on_cuda(dev):
    with fake_cuda():
        base = torch.ones(2, 3)
        made = [
            torch.full((2, 3), 1.5, device=dev),
            torch.zeros(2, device=dev),
            torch.ones(2, device=dev),
            torch.empty(2, device=dev),
            torch.arange(4, device=dev),
            torch.tensor([1, 2], device=dev),
            torch.rand(3, device=dev),
            torch.randint(0, 5, (3,), device=dev),
            torch.eye(2, device=dev),
            torch.zeros_like(base, device=dev),
            torch.as_tensor([1.0], device=dev),
            base.new_zeros(2, device=dev),
            base.new_tensor([1.0], device=dev),
        ]
        for t in made:
            assert t.device == CUDA0 and t.is_cuda and not t.is_cpu and t.get_device() == 0, t
            assert is_fake_cuda(t) and type(t) is torch.Tensor
        assert torch.full((2,), 1.0, device=dev).tolist() == [1.0, 1.0]
        # without a device, factories stay on CPU; *_like and new_* follow their template
        cuda = torch.ones(2, device=dev)
        assert torch.zeros(2).device.type == "cpu"
        assert torch.zeros_like(cuda).is_cuda and cuda.new_ones(3).is_cuda and cuda.new_tensor([1]).is_cuda
        assert not torch.zeros_like(cuda, device="cpu").is_cuda
        assert torch.tensor(cuda).is_cuda and not torch.tensor([1.0]).is_cuda


def test_moving_between_devices():
    with fake_cuda():
        cpu = torch.arange(4.0)
        cuda = cpu.to("cuda")
        assert cuda.device == CUDA0 and not cpu.is_cuda
        cpu.add_(10)  # a real move is a copy
        assert cuda.tolist() == [0.0, 1.0, 2.0, 3.0]
        assert cuda.to("cuda") is cuda and cuda.cuda() is cuda and cuda.to(cuda) is cuda
        assert cuda.to(torch.float16).is_cuda and cuda.to(torch.float16).dtype == torch.float16  # dtype only
        for back in (cuda.cpu(), cuda.to("cpu"), cuda.to(torch.device("cpu")), cuda.to(cpu), cpu.type_as(cpu)):
            assert back.device.type == "cpu" and not is_fake_cuda(back) and back is not cuda
        assert cpu.to(cuda).is_cuda and cpu.cuda().is_cuda and cpu.to(0).is_cuda and cpu.type_as(cuda).is_cuda
        assert cpu.to(device="cuda", dtype=torch.float64).dtype == torch.float64
        assert torch.device(0) == CUDA0
        assert cuda.type() == "torch.cuda.FloatTensor"
        assert "device='cuda:0'" in repr(cuda) and "device" not in repr(cpu)
        with pytest.raises(RuntimeError, match="invalid device ordinal"):
            cpu.to("cuda:1")
        with pytest.raises(RuntimeError, match="invalid device ordinal"):
            torch.zeros(1, device="cuda:1")
        x = cpu.clone().requires_grad_()  # moves are differentiable, as on CUDA
        (x.cuda() * 2).cpu().sum().backward()
        assert x.grad.tolist() == [2.0] * 4


def test_mixing_devices_raises_like_cuda():
    with fake_cuda():
        cuda, cpu = torch.ones(3, device="cuda"), torch.ones(3)
        for bad in (
            lambda: cuda + cpu,
            lambda: cpu * cuda,
            lambda: torch.cat([cuda, cpu]),
            lambda: torch.where(cpu > 0, cuda, cuda),
            lambda: cpu.add_(cuda),
            lambda: cpu * torch.tensor(2.0, device="cuda"),  # a CUDA scalar is not a CPU scalar
            lambda: cpu[torch.tensor([0, 1], device="cuda")],
            lambda: torch.zeros(3, 3, device="cuda").index_put_((torch.tensor([0]),), torch.ones(1, 3)),
        ):
            with pytest.raises(RuntimeError, match=SAME_DEVICE + "|indices should be"):
                bad()
        with pytest.raises(RuntimeError, match=SAME_DEVICE):
            nn.Linear(3, 2).cuda()(cpu)


@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")
def test_what_cuda_allows_stays_allowed():
    with fake_cuda():
        cuda, cpu = torch.ones(3, device="cuda"), torch.arange(3.0)
        scalar = torch.tensor(2.0)
        assert (cuda * scalar).is_cuda and (scalar + cuda).is_cuda and (cuda * 3).is_cuda  # 0-dim CPU = scalar
        assert torch.clamp(cuda, min=torch.tensor(0.0)).is_cuda
        cuda.mul_(scalar)
        assert cuda.is_cuda  # in-place ops never move self
        cuda.copy_(cpu)  # copies cross devices both ways
        assert cuda.is_cuda and cuda.tolist() == [0.0, 1.0, 2.0]
        cpu.copy_(cuda * 2)
        assert not cpu.is_cuda and cpu.tolist() == [0.0, 2.0, 4.0]
        cuda[0] = torch.tensor(9.0)  # CPU values and indices in setitem/getitem
        cuda[1:] = torch.tensor([7.0, 8.0])
        cuda[torch.tensor([True, False, False])] = 5.0
        assert cuda.tolist() == [5.0, 7.0, 8.0]
        assert cuda[torch.tensor([2, 0])].is_cuda and cuda[torch.tensor([2, 0])].tolist() == [8.0, 5.0]
        assert cuda[cpu > 1].is_cuda
        assert torch.zeros(3, device="cuda").index_put_((torch.tensor([0]),), torch.tensor(1.0)).is_cuda
        assert cuda.sum().item() == 20.0 and float(cuda[0]) == 5.0 and f"{cuda.sum():.1f}" == "20.0"
        assert cuda.new_tensor(cpu).is_cuda and torch.tensor([cuda[0], cuda[1]]).device.type == "cpu"
        assert all(t.is_cuda for t in cuda) and all(t.is_cuda for t in cuda.split(1))
        values, idx = torch.max(cuda.view(1, 3), dim=1)
        assert values.is_cuda and idx.is_cuda
        assert copy.deepcopy(cuda).is_cuda
        assert cuda.view_as(cpu).is_cuda and cuda.expand_as(cpu).is_cuda  # only the other's shape is read
        a, b = torch.broadcast_tensors(cuda, cpu)
        assert a.is_cuda and not b.is_cuda
        w, v = torch.ones(3, device="cuda", requires_grad=True), torch.ones(3, requires_grad=True)
        gw, gv = torch.autograd.grad((w * 2).sum() + (v * 3).sum().cuda(), [w, v])
        assert gw.is_cuda and not gv.is_cuda


def test_numpy_needs_cpu_first():
    with fake_cuda():
        cuda = torch.arange(3.0, device="cuda")
        with pytest.raises(TypeError, match=NUMPY):
            cuda.numpy()
        with pytest.raises(TypeError, match=NUMPY):
            np.asarray(cuda)
        assert cuda.cpu().numpy().tolist() == [0.0, 1.0, 2.0] and cuda.numpy(force=True).sum() == 3.0
        assert torch.arange(3.0).numpy().sum() == 3.0  # CPU tensors are untouched
        with pytest.raises(RuntimeError, match="pinned"):
            cuda.pin_memory()


# ------------------------------------------------------------------------------------------ modules
def test_module_moves_keep_their_parameter_objects():
    lin = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    lin(torch.ones(4, 3)).sum().backward()
    params = list(lin.parameters())
    with fake_cuda():
        assert lin.cuda() is lin
        assert [id(p) for p in lin.parameters()] == [id(p) for p in params]  # as on CUDA: same Parameter objects
        assert all(isinstance(p, nn.Parameter) and p.is_cuda and p.grad.is_cuda for p in lin.parameters())
        assert all(b.is_cuda for b in lin.buffers())
        assert lin(torch.ones(4, 3, device="cuda")).is_cuda
        built = nn.Linear(3, 2, device="cuda")
        assert built.weight.is_cuda and isinstance(built.weight, nn.Parameter)
        assert nn.Parameter(torch.ones(2, device="cuda")).is_cuda
        with pytest.raises(RuntimeError, match="different device"):
            built.weight.grad = torch.zeros(2, 3)
        built.weight.grad = torch.zeros(2, 3, device="cuda")
        lin.load_state_dict({k: v.cpu() for k, v in lin.state_dict().items()})  # load from CPU: fine
        assert all(p.is_cuda for p in lin.parameters())
        lin.cpu()
        assert not any(p.is_cuda for p in lin.parameters()) and not any(b.is_cuda for b in lin.buffers())
        lin.to(torch.device("cuda", 0)).to(torch.float64)
        assert all(p.is_cuda and p.dtype == torch.float64 for p in lin.parameters())
    assert not any(is_fake_cuda(p) for p in lin.parameters())


@pytest.mark.parametrize("flag", ["overwrite", "swap"])
def test_module_moves_under_torch_future_flags(flag):
    setter = getattr(torch.__future__, f"set_{flag}_module_params_on_conversion")
    setter(True)
    try:
        with fake_cuda():
            lin = nn.Linear(2, 2).cuda()
            assert isinstance(lin.weight, nn.Parameter) and lin.weight.is_cuda and lin.bias.is_cuda
            assert lin(torch.ones(1, 2, device="cuda")).is_cuda
    finally:
        setter(False)


# ---------------------------------------------------------------------------------------- torch.cuda
def test_torch_cuda_answers_for_one_device():
    with fake_cuda():
        assert torch.cuda.is_available() and torch.cuda.device_count() == 1 and torch.cuda.current_device() == 0
        for dev in (0, "cuda", "cuda:0", torch.device("cuda", 0)):
            torch.cuda.set_device(dev)
        with pytest.raises(RuntimeError, match="invalid device ordinal"):
            torch.cuda.set_device(1)
        with torch.cuda.device(0):
            pass
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        assert torch.cuda.memory_allocated() == 0
        with pytest.raises(Exception, match="not compiled with CUDA|requires CUDA"):
            torch.cuda.get_device_capability()  # not emulated: says so


@pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")
def test_nccl_collectives_refuse_cpu_tensors():
    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with fake_cuda():
            x = torch.ones(3, device="cuda")
            dist.all_reduce(x)
            assert x.is_cuda and x.tolist() == [1.0] * 3
            with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
                dist.all_reduce(torch.ones(3))
            with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
                dist.all_gather_into_tensor(torch.zeros(3, device="cuda"), torch.ones(3))
            out = [None]
            dist.all_gather_object(out, {"a": 1})  # torch moves object payloads itself
            assert out == [{"a": 1}]
        with fake_cuda(nccl=False):
            dist.all_reduce(torch.ones(3))
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ clean exit
def _globals():
    names = [
        "is_available",
        "device_count",
        "current_device",
        "set_device",
        "device",
        "synchronize",
        "empty_cache",
        "memory_allocated",
        "reset_peak_memory_stats",
    ]
    return (
        [vars(torch.cuda).get(n) for n in names]
        + [vars(nn.Parameter)["__new__"], torch.utils.swap_tensors]
        + [getattr(dist, n) for n in ("all_reduce", "broadcast", "all_gather_into_tensor", "send")]
    )


def test_everything_is_restored_on_exit():
    before = _globals()
    available, count = torch.cuda.is_available(), torch.cuda.device_count()
    with fake_cuda():
        kept = torch.ones(2, device="cuda")
        model = nn.Linear(2, 2).cuda()
        assert _globals() != before
    after = _globals()
    assert all(a is b for a, b in zip(after, before))
    assert torch.cuda.is_available() is available is False and torch.cuda.device_count() == count == 0
    assert kept.device.type == "cpu" and not kept.is_cuda and not is_fake_cuda(kept)
    assert not model.weight.is_cuda and model(torch.ones(2)).device.type == "cpu"  # usable on CPU again
    assert kept.numpy().tolist() == [1.0, 1.0]
    assert torch.zeros(2).device.type == "cpu" and not torch.overrides._get_current_function_mode_stack()
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")  # the real CPU build again


def test_restored_after_an_error_and_nesting_shares_state():
    before = _globals()
    with pytest.raises(KeyError):
        with fake_cuda():
            raise KeyError("boom")
    assert all(a is b for a, b in zip(_globals(), before)) and not torch.cuda.is_available()

    outer = FakeCuda()
    with outer:
        x = torch.ones(2, device="cuda")
        with fake_cuda(), outer:  # nested and re-entered: the outer tensors stay on cuda, nothing is undone early
            assert x.is_cuda and (x + torch.ones(2, device="cuda")).is_cuda
            with pytest.raises(RuntimeError, match=SAME_DEVICE):
                x + torch.ones(2)
        assert x.is_cuda and torch.cuda.is_available()
        assert len(torch.overrides._get_current_function_mode_stack()) == 1
    assert not x.is_cuda and not torch.cuda.is_available()
    assert all(a is b for a, b in zip(_globals(), before))


def test_tensors_made_before_the_context_are_cpu():
    cpu = torch.ones(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with fake_cuda():
            assert cpu.device.type == "cpu" and (cpu + 1).device.type == "cpu"
            assert cpu.numpy().sum() == 3.0
