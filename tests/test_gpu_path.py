"""The GPU path without a GPU: training steps, validation and evaluation with the model on a
second, device-strict stand-in device (tests/helpers/standin_device.py), so a batch, a catalogue
table or a collective left on the CPU fails here as it fails on CUDA ("Expected all tensors
to be on the same device"). At 49ba7a7 validation and ranking fail this way (they decoded on
``device="cpu"`` whatever the model's device) and the training loop fed CPU batches to the
engine; both ran on an H200 only after the fixes these tests pin."""

import copy

import numpy as np
import pytest
import torch
from helpers.paths import CONFIGS
from helpers.standin_device import standin_device

from diffgrm_dist.core.config import load_config
from diffgrm_dist.data.loaders import ShardSet
from diffgrm_dist.data.sids import load_sids
from diffgrm_dist.decode.catalogue import catalogue_for
from diffgrm_dist.decode.search import SearchOptions
from diffgrm_dist.evaluate.ranking import Queries, rank_queries
from diffgrm_dist.model.network import DiffGRM, SidSpec
from diffgrm_dist.train.engine import build_model, build_objective, sum_over_ranks, train_step
from diffgrm_dist.train.trainer import training_batches, validate, validation_queries

TINY = CONFIGS / "tiny.yaml"
DECODERS = ("diffusion", "autoregressive", "dense")


class StandInEngine:
    """What ``train_step`` asks of a DeepSpeed engine (call, backward, step, device) for a module
    on the stand-in device, where DeepSpeed cannot place it; real engines run in test_train."""

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.module, self.device = module, device
        self.optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        return self.module(*args)

    def backward(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()


def tiny_parts(tiny_run, decoder: str):
    cfg = load_config(TINY, [f"model.decoder={decoder}", "train.loader_workers=0"])
    train_set = ShardSet.load(tiny_run / "shard", "train")
    sid_table = load_sids(tiny_run / "tokenize")
    spec = SidSpec(train_set.digit_sizes, train_set.max_history, items=len(sid_table.codes))
    torch.manual_seed(0)
    model = build_model(cfg.model, spec)
    return cfg, train_set, sid_table, model


def test_the_standin_device_fails_where_cuda_fails():
    with standin_device() as device:
        a, b = torch.ones(3, 4, device=device), torch.ones(4, 2)
        with pytest.raises(RuntimeError, match="same device"):
            a @ b
        product = a @ b.to(device)
        assert product.device == device and product.cpu().sum().item() == 24.0
        assert (a * torch.tensor(2.0)).sum().item() == 24.0  # a CPU scalar is fine, as on CUDA
        with pytest.raises(TypeError):
            product.numpy()  # a device tensor must come to the host first
        with pytest.raises(RuntimeError, match="same device"):
            torch.cat([a, torch.zeros(1, 4)])


@pytest.mark.parametrize("decoder", DECODERS)
def test_training_steps_run_with_the_model_on_another_device(tiny_run, decoder):
    cfg, train_set, _, model = tiny_parts(tiny_run, decoder)
    batches = training_batches(train_set, cfg, rank=0, world=1)
    batches.set_epoch(1)
    with standin_device() as device:
        engine = StandInEngine(build_objective(model, cfg).to(device), device)
        before = model.codes.weight.cpu().clone()
        losses = [train_step(engine, batch, torch.autocast("cpu", enabled=False))
                  for batch, _ in zip(batches, range(2))]
        assert all(loss.device == device for loss in losses)  # left on the device: no host sync
        assert all(np.isfinite(loss.item()) for loss in losses)
        assert model.codes.weight.grad.device == device
        assert not torch.equal(model.codes.weight.cpu(), before)
        assert sum_over_ranks([1.0, 2.5], device) == [1.0, 2.5]


@pytest.mark.parametrize("decoder", DECODERS)
def test_validation_and_ranking_run_on_the_models_device_and_match_the_cpu(tiny_run, decoder):
    cfg, _, sid_table, model = tiny_parts(tiny_run, decoder)
    cfg.eval.fill_order = "random" if decoder == "diffusion" else "confidence"
    sids, catalogue = torch.from_numpy(sid_table.codes.astype(np.int64)), catalogue_for(sid_table)
    valid = validation_queries(tiny_run / "prepare", cfg, rank=0, world=1)
    test = Queries.from_split(tiny_run / "prepare", "test")
    fill_order = torch.from_numpy(np.random.default_rng(0).permutation(len(sid_table.sizes)))
    fill_order = fill_order if decoder == "diffusion" else None
    test_options = SearchOptions(cfg.eval.beam_size, decoder, cfg.eval.final_step, fill_order)
    want_valid = validate(model, valid, sids, catalogue, cfg, cfg.eval.valid_beam_size)
    want_test = rank_queries(model.eval(), test, sids, catalogue, cfg.eval, test_options)
    with standin_device() as device:
        moved: DiffGRM = copy.deepcopy(model).to(device)
        got_valid = validate(moved, valid, sids, catalogue, cfg, cfg.eval.valid_beam_size)
        got_test = rank_queries(moved.eval(), test, sids, catalogue, cfg.eval, test_options)
    assert got_valid == pytest.approx(want_valid, rel=1e-6)
    assert got_test.keys() == want_test.keys()
    for key, value in want_test.items():
        np.testing.assert_allclose(got_test[key], value, rtol=1e-5, err_msg=key)


# --------------------------------------------------------------------------- numerics


def test_attention_in_slices_ranks_exactly_as_one_call(tiny_run, monkeypatch):
    """Beam x batch rows above the fused-kernel limit (cuDNN failed at 65,536 rows) are sliced
    on a GPU; here a CPU limit below the tiny run's rows makes slicing happen on the CPU."""
    from diffgrm_dist.model import network as model_module

    test = Queries.from_split(tiny_run / "prepare", "test")
    for decoder in ("diffusion", "autoregressive"):
        cfg, _, sid_table, model = tiny_parts(tiny_run, decoder)
        sids, catalogue = torch.from_numpy(sid_table.codes.astype(np.int64)), catalogue_for(sid_table)
        options = SearchOptions(cfg.eval.beam_size, decoder, cfg.eval.final_step)
        whole = rank_queries(model.eval(), test, sids, catalogue, cfg.eval, options)
        calls: list[int] = []
        sdpa = torch.nn.functional.scaled_dot_product_attention
        monkeypatch.setattr(model_module.F, "scaled_dot_product_attention",
                            lambda q, *a, **kw: calls.append(q.shape[0] * q.shape[1]) or sdpa(q, *a, **kw))
        monkeypatch.setitem(model_module.ATTENTION_BATCH_LIMIT, "cpu", 64)
        sliced = rank_queries(model, test, sids, catalogue, cfg.eval, options)
        monkeypatch.undo()
        assert max(calls) <= 64 and len(calls) > 4 * cfg.model.decoder_layers  # really sliced
        for key, value in whole.items():  # the kernel's sums may differ in the last bit
            if key == "scores":
                np.testing.assert_allclose(sliced[key], value, rtol=1e-6, err_msg=decoder)
            else:
                np.testing.assert_array_equal(sliced[key], value, err_msg=f"{decoder} {key}")


@pytest.mark.parametrize("decoder", DECODERS)
def test_logits_are_fp32_under_bf16_autocast(tiny_run, decoder):
    _, _, _, model = tiny_parts(tiny_run, decoder)
    history = torch.randint(0, 16, (4, 5, 3))
    mask = torch.ones(4, 5, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        memory = model.eval().encode(history, mask)
        assert memory.kv[0][0].dtype == torch.bfloat16 if memory.kv else memory.last.dtype == torch.float32
        if decoder == "dense":
            logits = [model.item_logits(memory)]
        elif decoder == "diffusion":
            logits = [model.denoise(memory, torch.zeros(4, 3, dtype=torch.long), torch.ones(4, 3, dtype=torch.bool))]
        else:
            logits = [model.autoregress(memory, torch.zeros(4, 2, dtype=torch.long)),
                      model.autoregress_step(memory, None, 0, None)[0]]
    assert all(t.dtype == torch.float32 for t in logits)


@pytest.fixture(scope="module")
def bf16_run(tiny_run, tmp_path_factory):
    """The tiny run trained under DeepSpeed bf16 (bf16 weights, fp32 master copies) and bf16
    autocast, ZeRO-1, in this process."""
    import shutil

    from diffgrm_dist.cli import main

    run = tmp_path_factory.mktemp("bf16") / "run"
    shutil.copytree(tiny_run, run)
    assert main(["train", "-c", str(TINY), "-o", str(run), "train.launcher=local", "train.bf16=true",
                 "train.autocast_bf16=true", "train.epochs=3", "train.lr=1.0e-2", "train.wandb_mode=disabled"]) == 0
    return run


@pytest.mark.slow
def test_the_exported_weights_are_the_fp32_master_copies(bf16_run):
    from safetensors.torch import load_file

    weights = load_file(str(bf16_run / "train" / "model.safetensors"))
    assert all(w.dtype == torch.float32 for w in weights.values())
    # A bf16 copy widened to fp32 is exactly representable in bf16; the master copy is not.
    off_grid = sum(int((w != w.bfloat16().float()).sum()) for w in weights.values())
    assert off_grid > 0.5 * sum(w.numel() for w in weights.values() if w.dim() > 1)


def test_bf16_autocast_ranks_the_top10_as_fp32(bf16_run):
    """Decoding under bf16 autocast (encoder and decoder blocks in bf16, logits in fp32) against
    fp32 on the same trained weights: the same top-10 for nearly every user."""
    from diffgrm_dist.model.export import load_exported

    cfg = load_config(TINY, ["eval.beam_size=32"])
    sid_table = load_sids(bf16_run / "tokenize")
    sids, catalogue = torch.from_numpy(sid_table.codes.astype(np.int64)), catalogue_for(sid_table)
    model = load_exported(bf16_run / "train")
    test = Queries.from_split(bf16_run / "prepare", "test")
    options = SearchOptions(32, "diffusion", cfg.eval.final_step)
    fp32 = rank_queries(model, test, sids, catalogue, cfg.eval, options)
    cfg.eval.autocast_bf16 = True
    bf16 = rank_queries(model, test, sids, catalogue, cfg.eval, options)
    same_set = np.mean([set(a) == set(b) for a, b in zip(fp32["items"][:, :10], bf16["items"][:, :10])])
    same_order = np.mean((fp32["items"][:, :10] == bf16["items"][:, :10]).all(1))
    print(f"bf16 vs fp32 on {len(test)} users: same top-10 set {same_set:.3f}, same order {same_order:.3f}, "
          f"item N@10 {fp32['item/ndcg@10'].mean():.4f} vs {bf16['item/ndcg@10'].mean():.4f}")
    assert same_set >= 0.9
    assert abs(fp32["item/ndcg@10"].mean() - bf16["item/ndcg@10"].mean()) < 0.01


# --------------------------------------------------------------------------- devices and state


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    from diffgrm_dist.train.checkpoints import load_partial, save_partial

    torch.manual_seed(7)
    save_partial(tmp_path, 0, {"epoch": 1}, torch.device("cpu"))
    want = torch.rand(5)
    torch.manual_seed(8)
    assert load_partial(tmp_path, 0, torch.device("cpu")) == {"epoch": 1}
    assert torch.equal(torch.rand(5), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rng_state_round_trips_through_a_checkpoint(tmp_path):
    from diffgrm_dist.train.checkpoints import load_partial, save_partial

    device = torch.device("cuda", 0)
    torch.cuda.manual_seed(7)
    save_partial(tmp_path, 0, None, device)
    want = torch.rand(5, device=device)
    torch.cuda.manual_seed(8)
    load_partial(tmp_path, 0, device)
    assert torch.equal(torch.rand(5, device=device), want)


def test_use_gpu_false_trains_on_the_cpu_on_a_gpu_host(tiny_run, monkeypatch):
    """On a GPU host DeepSpeed resolves the CUDA accelerator; ``use_gpu=false`` must override it."""
    import deepspeed.accelerator.real_accelerator as real
    from deepspeed.accelerator import get_accelerator
    from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

    from diffgrm_dist.train.engine import build_engine, init_local_process_group, training_device, use_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    monkeypatch.setattr(real, "ds_accelerator", CUDA_Accelerator())  # as resolved on a GPU host
    cfg, train_set, _, _ = tiny_parts(tiny_run, "diffusion")
    device = training_device(cfg, "local")
    assert device == torch.device("cpu")
    use_device(device)
    assert get_accelerator().device_name() == "cpu" and real.os.environ["DS_ACCELERATOR"] == "cpu"
    init_local_process_group(device)
    engine, model, _ = build_engine(cfg, SidSpec(train_set.digit_sizes, train_set.max_history), 1, 10)
    assert engine.device.type == "cpu" and next(model.parameters()).device.type == "cpu"


def test_gpu_ranks_default_to_every_gpu_and_get_cores_for_their_loaders():
    from diffgrm_dist.cluster.raycluster import ClusterResources
    from diffgrm_dist.train.launch import worker_layout

    cfg = load_config(TINY, ["train.num_workers=0", "train.use_gpu=true", "train.loader_workers=2"])
    gpus = ClusterResources(cpus=64, gpus=8, nodes=2, max_node_cpus=32)
    assert worker_layout(cfg.train, gpus) == (8, 3, True)
    assert worker_layout(cfg.train, ClusterResources(cpus=2, gpus=0, nodes=1, max_node_cpus=2)) == (1, 2, False)
    cfg.train.use_gpu = False
    assert worker_layout(cfg.train, gpus) == (1, 32, False)


def test_a_shortened_schedule_is_one_warning():
    from diffgrm_dist.train.engine import schedule_warning

    paper = load_config(CONFIGS / "beauty.yaml").train
    assert schedule_warning(paper, total_steps=paper.epochs * 107) is None
    cut = load_config(CONFIGS / "beauty.yaml", ["train.epochs=32", "train.warmup_steps=600"]).train
    message = schedule_warning(cut, total_steps=32 * 107)
    assert "train.epochs=32" in message and "1e-2" in message and "warmup_steps=600 is" not in message
    long_warmup = schedule_warning(paper, total_steps=5000)
    assert "train.warmup_steps=10000 is more than the run's 5000 steps" in long_warmup
