"""The `csrm` method (`wsss/methods/csrm.py`): the σ_s2c ramps, one training step's terms and
forwards, its representation branch, checkpoints, two DDP replicas, starting from a `cam`
run, its settings, and the ground-truth upper-bound script. Its parts have their own files:
test_csrm_{teacher,losses,bank,contrast,pseudo}.py."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel
from torchvision.models.segmentation.deeplabv3 import ASPP

from tests.helpers import ROOT
from wsss.methods.base import BackboneConfig, DatasetStats, Progress, build_method, valid_at
from wsss.methods.csrm import CSRM, CSRMConfig
from wsss.methods.csrm_contrast import negative_candidates, select_queries
from wsss.methods.csrm_losses import reliable_mask, s2c_loss
from wsss.platform.checkpoints import load_method, save_checkpoint, start_fresh
from wsss.platform.config import ConfigError, TrainConfig

K = 3
SIZE = 64
TINY = BackboneConfig("resnet18", 16, "none")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_method(spec: str = "csrm", **overrides) -> CSRM:
    torch.manual_seed(0)
    config = CSRMConfig(**{"crf_workers": 0, "query_threshold": 0.0, **overrides})
    method = build_method(spec, K, {"csrm": config}, TINY)
    method.on_dataset(DatasetStats(3, torch.tensor([[1, 1, 0, 1], [1, 0, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)))
    return method


def random_batch(generator: torch.Generator, batch: int = 2) -> dict:
    labels = (torch.rand(batch, K, generator=generator) < 0.5).float()
    labels[torch.arange(batch), torch.arange(batch) % K] = 1.0
    valid = torch.ones(batch, SIZE, SIZE, dtype=torch.bool)
    valid[:, :, -8:] = False
    return {"image": torch.randn(batch, 3, SIZE, SIZE, generator=generator), "labels": labels, "valid": valid,
            "raw": torch.randint(0, 256, (batch, SIZE, SIZE, 3), generator=generator, dtype=torch.uint8)}


def train(method: CSRM, steps: int, steps_per_epoch: int = 1, epochs: int = 3, seed: int = 0,
          lr: float = 1e-4) -> list[dict]:
    optimizer = torch.optim.SGD(method.param_groups(lr), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    history = []
    method.train()
    for step in range(steps):
        progress = Progress(epoch=step // steps_per_epoch, step=step, steps_per_epoch=steps_per_epoch,
                            epochs=epochs)
        terms = method.training_step(random_batch(generator), progress)
        loss = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        method.after_step(progress)
        history.append({k: float(v.detach()) for k, v in terms.items()})
    return history


# ---- the σ_s2c ramps ------------------------------------------------------------------------------

# σ_s2c ramp: 10 epochs of 10 steps, the first epoch warm-up. "threshold" (the paper's text,
# Sec. 4): σ rises 0.1 -> 1 over training, λ_s2c fixed. "weight" (the authors' code): σ fixed,
# λ_s2c rises from 0.1·λ to λ over the steps after the warm-up (steps 10..100).
S2C_SCHEDULES = {
    "threshold": [(10, 2.0, 0.1 + 0.9 * 0.1), (55, 2.0, 0.1 + 0.9 * 0.55), (100, 2.0, 1.0)],
    "weight": [(10, 2.0 * 0.1, 0.5), (55, 2.0 * (0.1 + 0.9 * 0.5), 0.5), (100, 2.0, 0.5)],
}


@pytest.mark.parametrize("ramp", sorted(S2C_SCHEDULES))
def test_s2c_ramp_sets_weight_and_threshold_by_hand_computation(ramp):
    method = make_method(s2c_ramp=ramp, s2c_weight=2.0, s2c_threshold=0.5, warmup_epochs=1.0)
    for step, weight, sigma in S2C_SCHEDULES[ramp]:
        got = method._s2c_schedule(Progress(epoch=min(step // 10, 9), step=step, steps_per_epoch=10, epochs=10))
        assert got == pytest.approx((weight, sigma)), f"{ramp} at step {step}"


@pytest.mark.parametrize("ramp", sorted(S2C_SCHEDULES))
def test_the_s2c_term_is_the_ramps_weight_times_eq9_at_the_ramps_threshold(ramp, monkeypatch):
    import wsss.methods.csrm as csrm_module

    calls = []

    def spy_s2c(*args):
        calls.append((args[3], s2c_loss(*args)))
        return calls[-1][1]

    monkeypatch.setattr(csrm_module, "s2c_loss", spy_s2c)
    method = make_method(s2c_ramp=ramp, s2c_weight=2.0, s2c_threshold=0.5, warmup_epochs=1.0)
    method.train()
    step, weight, sigma = S2C_SCHEDULES[ramp][1]
    terms = method.training_step(random_batch(torch.Generator().manual_seed(0)),
                                 Progress(epoch=step // 10, step=step, steps_per_epoch=10, epochs=10))
    (used_sigma, loss), = calls
    assert used_sigma == pytest.approx(sigma)
    assert terms["s2c"].item() == pytest.approx(weight * loss.item(), rel=1e-6)


def test_bad_s2c_ramp_is_named():
    with pytest.raises(ValueError, match="csrm.s2c_ramp='sigma': must be one of threshold, weight"):
        CSRMConfig(s2c_ramp="sigma")


# ---- training steps ----------------------------------------------------------------------------------

def test_trains_in_a_plain_loop_with_every_term_after_warmup():
    method = make_method()
    calls = []
    pasted = []
    method.network.register_forward_hook(
        lambda module, args, out: calls.append((args[0].shape[0], out["representation"].shape[0])))
    before_forward = method.before_forward

    def count_pasted_rows(batch, progress):
        added = before_forward(batch, progress)
        masks = added["csrm_step"].mix_masks
        pasted.append(0 if masks is None else int(masks.flatten(1).any(dim=1).sum()))
        return added

    method.before_forward = count_pasted_rows
    history = train(method, steps=3)  # step 0: warm-up; steps 1-2: every term
    assert calls == [(2 + rows, 2) for rows in pasted] and pasted[0] == 0, \
        "one student forward per step: weak view, then weak + the rows ClassMix pasted into; " \
        "the representation of the weak view only"
    for terms in history:
        assert set(terms) == {"cls", "seg", "s2c", "unsup", "contrast"}
        assert all(math.isfinite(v) for v in terms.values()), terms
    assert history[0]["s2c"] == history[0]["unsup"] == history[0]["contrast"] == 0.0
    for terms in history[1:]:
        assert terms["s2c"] > 0 and terms["unsup"] > 0 and terms["contrast"] > 0, terms
    assert method.negative_bank.count.sum() > 0
    teacher, student = dict(method.teacher.named_parameters()), dict(method.network.named_parameters())
    assert not all(torch.equal(teacher[k], student[k]) for k in student), "after warm-up the teacher is an EMA"
    assert not any(p.requires_grad for p in method.teacher.parameters())


def test_rows_classmix_leaves_alone_take_their_unsup_logits_from_the_weak_view():
    """At ClassMix probability 0 every "mixed" row is the weak image: the student runs the
    weak view only, and L_u is still computed, on the weak view's logits."""
    method = make_method(classmix_probability=0.0, warmup_epochs=0)
    rows = []
    method.network.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    history = train(method, steps=2)
    assert rows == [2, 2]
    assert all(terms["unsup"] > 0 and math.isfinite(terms["unsup"]) for terms in history), history


def test_reliable_pixels_feed_queries_and_unsup_to_the_end_of_training(monkeypatch):
    """At 99% of training α_t is 0.2% and almost every pixel is reliable: L_m must still have
    queries (they do not shrink to the lowest α_t of entropy), negatives come from the few
    others, and L_u's entropy is of the teacher's own probabilities, not those restricted
    to the image labels."""
    import wsss.methods.csrm as csrm_module

    seen = {"entropy_of": []}

    def spy_queries(*args):
        seen["reliable"] = args[4]
        return select_queries(*args)

    def spy_negatives(*args):
        seen["unreliable"] = args[2]
        return negative_candidates(*args)

    def spy_reliable(probs, *args):
        seen["entropy_of"].append(probs)
        return reliable_mask(probs, *args)

    monkeypatch.setattr(csrm_module, "select_queries", spy_queries)
    monkeypatch.setattr(csrm_module, "negative_candidates", spy_negatives)
    monkeypatch.setattr(csrm_module, "reliable_mask", spy_reliable)
    method = make_method(warmup_epochs=0)
    method.train()
    generator = torch.Generator().manual_seed(0)
    for step in (98, 99):  # the first step fills the bank
        batch = random_batch(generator)
        batch["labels"][:, 2] = 0  # class 2 (index 3 with background) is in no image
        progress = Progress(epoch=0, step=step, steps_per_epoch=100, epochs=1)
        terms = method.training_step(batch, progress)
        method.after_step(progress)
    valid = valid_at(batch["valid"], seen["reliable"].shape[-2:])
    assert seen["reliable"].sum() >= 0.99 * valid.sum() - 1
    assert torch.equal(seen["reliable"] | seen["unreliable"], valid) and not (seen["reliable"] & seen["unreliable"]).any()
    assert terms["contrast"] > 0
    mixed_probs = seen["entropy_of"][-1]  # L_u's call, after the weak view's
    assert mixed_probs[:, 3].min() > 0, "L_u's entropy must see the teacher's mass on classes absent from the labels"


def test_representation_branch_reads_the_segmentation_decoders_input_for_the_rows_asked():
    network = make_method().network.eval()
    assert not any(isinstance(m, ASPP) for m in network.representation_head.modules()), "the ASPP is shared"
    images = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        full, first = network(images), network(images, representation_rows=1)
        features = network.backbone(images)
        by_hand = network.representation_head(
            network.segmentation_head.decoder_input(features["high"], features["low"]))
    assert full["representation"].shape == (3, CSRMConfig().representation_dim, SIZE // 4, SIZE // 4)
    assert torch.allclose(full["representation"], by_hand)
    assert torch.allclose(first["representation"], full["representation"][:1], atol=1e-5)
    assert torch.equal(first["seg_logits"], full["seg_logits"])


def test_trains_from_real_shards_with_the_crf_reading_the_pipelines_uint8_image(shards):
    """The pipeline ships no separate CRF input: `model_inputs` hands csrm the uint8 image."""
    from wsss.platform.config import TrainConfig
    from wsss.platform.plain import train_plain

    config = TrainConfig(method="csrm", data=shards, epochs=1, batch_size=4, crop_size=64, backbone="resnet18",
                         output_stride=16, backbone_weights="none", lr=0.01, eval_every=0, wandb="disabled")
    _, history = train_plain(config.with_overrides({"csrm.warmup_epochs": 0.5, "csrm.crf_workers": 0}))
    losses = {key: value for key, value in history[0].items() if key.startswith("loss/")}
    assert set(losses) == {"loss/cls", "loss/seg", "loss/s2c", "loss/unsup", "loss/contrast"}
    assert all(math.isfinite(value) and value > 0 for value in losses.values()), losses
    assert 0 < history[0]["csrm/crf_labelled_fg"] < 1
    assert history[0]["csrm/crf_wait_s"] > 0, "CRF in the training process: all of it is waiting"


def test_teacher_and_bank_survive_a_state_dict_round_trip():
    method = make_method()
    train(method, steps=2)
    state = method.state_dict()
    assert any(k.startswith("teacher.") for k in state) and "negative_bank.items" in state
    restored = make_method()
    restored.load_state_dict(state)
    for key, value in restored.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert restored.negative_bank.count.sum() > 0


def ddp_worker(rank: int, world_size: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    method = make_method(crf_workers=1)  # a CRF pool inside a multiprocessing child must not block its exit
    method.distribute(lambda net: DistributedDataParallel(net, find_unused_parameters=method.find_unused_parameters))
    train(method, steps=2, seed=100 + rank)  # different data on each replica
    torch.save({k: v for k, v in method.state_dict().items() if k.startswith(("teacher.", "negative_bank."))},
               f"{folder}/state{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes importing torch: 20-60 s on a shared 2-core machine
def test_two_ddp_replicas_end_with_identical_banks_and_teachers(tmp_path):
    context = mp.start_processes(ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 400
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the DDP workers did not exit (a CRF process pool left running blocks the exit)")
    states = [torch.load(tmp_path / f"state{rank}.pt") for rank in range(2)]
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), f"replicas disagree on {key}"
    assert states[0]["negative_bank.count"].sum() > 0


def test_composes_with_ocr_and_exports_cams_or_segmentation(tmp_path):
    method = make_method("csrm+ocr").eval()
    assert [addon.name for addon in method.addons] == ["ocr"]
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert method.segmentation_logits(images).shape == (2, K + 1, SIZE // 4, SIZE // 4)
        cams = method.cam_maps(images)
    assert cams.shape == (2, K, SIZE // 16, SIZE // 16) and (cams >= 0).all()
    assert make_method(export="cam").segmentation_logits(images) is None


def test_a_csrm_started_from_a_cam_run_copies_it_to_the_teacher_and_keeps_its_classifier_at_low_lr(tmp_path):
    torch.manual_seed(1)
    cam = build_method("cam", K, backbone=TINY)
    start = tmp_path / "cam-run" / "checkpoint_000004"  # a run directory: its newest checkpoint
    start.mkdir(parents=True)
    torch.save({"method": cam.state_dict()}, start / "state.pt")
    (start / "checkpoint.json").write_text("{}")  # written last: the checkpoint is complete
    torch.manual_seed(0)
    method = build_method("csrm", K, {"csrm": CSRMConfig(crf_workers=0)},
                          dataclasses.replace(TINY, init_from=str(tmp_path / "cam-run")))
    assert not torch.equal(method.network.classifier.weight, cam.network.classifier.weight), "read at start only"
    start_fresh(method, str(tmp_path / "cam-run"))
    for name, value in cam.network.state_dict().items():
        assert torch.equal(method.network.state_dict()[name], value), name
        assert torch.equal(method.teacher.state_dict()[name], value), name
    groups = {g["name"]: {id(p) for p in g["params"]} for g in method.param_groups(0.01)}
    assert id(method.network.classifier.weight) in groups["backbone"], "a pretrained classifier keeps the low lr"


@pytest.mark.parametrize("spec", ["csrm", "csrm+ocr"])
def test_decoders_train_at_their_own_lr_and_every_parameter_is_in_one_group(spec):
    method = make_method(spec, decoder_lr_mult=0.2)
    groups = {g["name"]: g for g in method.param_groups(0.05)}
    network = method.network
    decoders = {id(p) for m in (network.segmentation_head, network.representation_head) for p in m.parameters()}
    assert {id(p) for p in groups["decoders"]["params"]} == decoders
    assert groups["decoders"]["lr"] == pytest.approx(0.05 * 0.2) and groups["decoders"]["lr_mult"] == 0.2
    assert {id(p) for p in groups["new"]["params"]} == {id(network.classifier.weight)}, "from scratch: 10×"
    assert groups["new"]["lr"] == pytest.approx(0.05 * method.new_layer_lr_mult)
    grouped = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in method.parameters() if p.requires_grad)


def test_a_run_started_from_cam_loads_after_the_cam_run_is_gone(tmp_path):
    cam_run = tmp_path / "cam-run"
    cam_run.mkdir()
    torch.save({"method": build_method("cam", K, backbone=TINY).state_dict()}, cam_run / "state.pt")
    config = TrainConfig(method="csrm", data="x", backbone="resnet18", output_stride=16,
                         backbone_weights="none", init_from=str(cam_run))
    config.check_inputs()
    method = build_method(config.method, K, config.sections, config.backbone_config)
    start_fresh(method, config.init_from)
    (tmp_path / "csrm").mkdir()
    save_checkpoint(tmp_path / "csrm", method, torch.optim.SGD(method.parameters(), lr=0.1), epoch=1, step=1,
                    config=config.to_dict(), dataset={"classes": ["background", *"abc"]})
    shutil.rmtree(cam_run)
    loaded, _ = load_method(str(tmp_path / "csrm"))
    for name, value in method.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_bad_configuration_and_missing_raw_are_named():
    with pytest.raises(ValueError, match="csrm.fg_threshold"):
        CSRMConfig(fg_threshold=0.01)
    with pytest.raises(ValueError, match="csrm.export"):
        CSRMConfig(export="both")
    with pytest.raises(ConfigError, match=r"batch_size=1: must be >= 2 for csrm \(its ClassMix"):
        TrainConfig(method="csrm+ocr", data="shards", batch_size=1)
    method = make_method()
    batch = random_batch(torch.Generator().manual_seed(0))
    del batch["raw"]
    with pytest.raises(KeyError, match="raw"):
        method.training_step(batch, Progress(epoch=0, step=0, steps_per_epoch=1, epochs=1))


def test_the_ground_truth_upper_bound_script_runs_an_epoch(shards, tmp_path):
    """benchmarks/csrm_oracle.py (docs/results.md): one epoch with the ground truth as L_s's
    labels. In its own process: the script patches `csrm` and the plain loop's pipeline."""
    script = ROOT / "benchmarks" / "csrm_oracle.py"
    result = subprocess.run([sys.executable, str(script), "--data", shards, "--labels", "ground-truth", "--epochs", "1"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    epoch = json.loads(lines[0].split("] ", 1)[1])
    assert epoch["epoch"] == 1 and 0 < epoch["csrm/crf_labelled_fg"] < 1 and math.isfinite(epoch["loss/seg"])
    assert lines[-1].startswith("labels ground-truth, seed 0, all val, single scale: segmentation mIoU"), result.stdout
