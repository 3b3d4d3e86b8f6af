"""Tokenizer training with two optimizers under Lightning's manual optimisation: the loss goes down on the
digits, accumulation equals one big batch, clipping and precision still work, the global step counts
generator steps, and a resume restores both optimizers exactly."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from visgen.nn.discriminator import PatchGAN
from visgen.paradigms.autoencoder import AutoencoderTraining
from visgen.tokenizers.autoencoders import KLAutoencoder, VQAutoencoder

NET = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)


def _module(kind: str = "vq", disc_start: int = 0, grad_clip: float | None = 1.0, seed: int = 0,
            disc_layers: int = 2, warmup_steps: int = 0, **loss: object) -> AutoencoderTraining:
    torch.manual_seed(seed)
    net = VQAutoencoder(**NET, latent_channels=8, num_codes=32, code_dim=4, l2_normalized=True) if kind == "vq" \
        else KLAutoencoder(**NET, latent_channels=4)
    return AutoencoderTraining(
        net, optimizer={"lr": 1e-3, "betas": (0.9, 0.95), "warmup_steps": warmup_steps}, image_size=16,
        batch_global=8, loss={"perceptual_weight": 0.0, "disc_start": disc_start, **loss},
        discriminator=PatchGAN(base_channels=8, num_layers=disc_layers), grad_clip=grad_clip, ema_decay=0.5,
        usage_every_n_steps=1)


def _images(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 256, (4, 3, 16, 16), generator=gen, dtype=torch.uint8),
             "label": torch.zeros(4, dtype=torch.long)} for _ in range(n)]


def _fit(module: AutoencoderTraining, batches: list, max_steps: int, accumulate: int = 1, precision: str = "32-true",
         ckpt: str | None = None, root: Path | None = None, callbacks: list | None = None) -> L.Trainer:
    module.accumulate_grad_batches = accumulate
    saves = any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in callbacks or [])
    if precision == "16-mixed":  # Lightning turns 16-mixed into bf16 on CPU unless given the plugin itself
        from lightning.pytorch.plugins import MixedPrecision

        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)  # small enough that a tiny net's grads stay finite
        precision_args = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=scaler)]}
    else:
        precision_args = {"precision": precision}
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, **precision_args, logger=False,
                        enable_checkpointing=saves, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=root, callbacks=callbacks or [])
    trainer.fit(module, DataLoader(batches, batch_size=None), ckpt_path=ckpt)
    return trainer


def _state(module: AutoencoderTraining) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_global_step_counts_generator_steps_and_both_optimizers_step(tmp_path: Path):
    module = _module()
    before = _state(module)
    trainer = _fit(module, _images(4), max_steps=2, accumulate=2, root=tmp_path)
    assert trainer.global_step == 2  # 4 micro-batches, accumulation 2: 2 generator (and 2 discriminator) steps
    after = module.state_dict()
    assert not torch.equal(before["net.decoder.conv_out.weight"], after["net.decoder.conv_out.weight"])
    assert not torch.equal(before["discriminator.main.0.weight"], after["discriminator.main.0.weight"])
    assert all(s["step"].item() == 2 for opt in trainer.optimizers for s in opt.state.values())


def test_accumulation_equals_one_big_batch():
    small = _images(2)
    big = [{"image": torch.cat([b["image"] for b in small]), "label": torch.cat([b["label"] for b in small])}]
    accumulated, single = _module(disc_start=10**6), _module(disc_start=10**6)  # GAN off: BatchNorm sees batches
    _fit(accumulated, small, max_steps=1, accumulate=2)
    _fit(single, big, max_steps=1, accumulate=1)
    for key, value in single.net.state_dict().items():
        assert torch.allclose(accumulated.net.state_dict()[key], value, atol=1e-6), key


def test_two_optimizer_accumulation_with_the_gan_on_equals_one_big_batch():
    small = _images(2)
    big = [{"image": torch.cat([b["image"] for b in small]), "label": torch.cat([b["label"] for b in small])}]
    # a PatchGAN without BatchNorm (0 strided layers), so D's output does not depend on the micro-batch split
    accumulated, single = _module(disc_layers=0), _module(disc_layers=0)
    _fit(accumulated, small, max_steps=1, accumulate=2)
    _fit(single, big, max_steps=1, accumulate=1)
    assert not torch.equal(single.discriminator.main[0].weight, _module(disc_layers=0).discriminator.main[0].weight)
    # atol: attention key biases get a zero gradient in exact arithmetic (softmax is shift-invariant), which
    # Adam's first step turns into ~3e-6 of rounding noise; a step per micro-batch moves weights by ~1e-3
    for key, value in single.state_dict().items():  # autoencoder, EMA and discriminator
        assert torch.allclose(accumulated.state_dict()[key], value, atol=1e-5), key


def test_the_discriminator_lr_follows_the_generator_step_and_no_scheduler_warning():
    import warnings

    module = _module(disc_start=2, warmup_steps=10)  # D idles for 2 steps, then starts at lr(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _fit(module, _images(3), max_steps=3)
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    lr_g, lr_d = (opt.param_groups[0]["lr"] for opt in trainer.optimizers)
    assert lr_g == lr_d == pytest.approx(1e-3 * 4 / 10)  # linear warmup (step + 1) / 10 at step 3


def test_kl_losses_follow_ldm_sums_over_pixels_including_the_adaptive_weight_clamp():
    """LDM's LPIPSWithDiscriminator sums its nll over the C·H·W values (visgen averages): the same loss up to
    that factor, and LDM's clamp λ <= 1e4 acts at 1e4 / (C·H·W) here (matched against LDM's code: tok notes)."""
    module = _module("kl", reconstruction="l1", adaptive_weight=True, disc_loss_weight=1.0)
    with torch.no_grad():
        module.discriminator.main[-1].weight.mul_(1e-7)  # D barely sees x̂: LDM's λ is clamped
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    total, recon, parts, _ = module.generator_loss(x, step=0)
    mean, logvar = module.net.encode(x).float().chunk(2, dim=1)
    n, last = x[0].numel(), module.net.last_layer
    nll = (x - recon).abs().sum() / len(x)  # LDM: sum over values, mean over the batch
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum() / len(x)
    g_loss = -module.discriminator(recon).mean()
    lam = torch.autograd.grad(nll, last, retain_graph=True)[0].norm() / (
        torch.autograd.grad(g_loss, last, retain_graph=True)[0].norm() + 1e-4)
    assert lam > 2e4  # LDM clamps it to 1e4; an unscaled clamp here would keep lam / n
    ldm = nll + 1e-6 * kl + 0.5 * min(lam.item(), 1e4) * g_loss
    assert total.item() * n == pytest.approx(ldm.item(), rel=1e-5)
    assert parts["adaptive_weight"].item() == pytest.approx(1e4 / n)
    hinge = 0.5 * (torch.relu(1 - module.discriminator(x)).mean() + torch.relu(1 + module.discriminator(recon)).mean())
    assert module.discriminator_loss(x, recon)[0].item() == pytest.approx(hinge.item())  # LDM: D's loss x 1
    module.loss_cfg["disc_loss_weight"] = None  # LlamaGen: x disc_weight
    assert module.discriminator_loss(x, recon)[0].item() == pytest.approx(0.5 * hinge.item())


class _GradNorms(L.Callback):
    """Records each optimizer's gradient norm at its actual step (after unscaling and clipping)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            optimizer.register_step_post_hook(self._record)  # grads are zeroed only after the step

    def _record(self, optimizer, args, kwargs) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.norms.append(torch.nn.utils.get_total_norm(grads).item())


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_gradients_are_clipped_per_optimizer_under_each_precision(precision: str):
    norms = _GradNorms()
    _fit(_module(grad_clip=1e-3), _images(2), max_steps=2, precision=precision, callbacks=[norms])
    # generator and discriminator, 2 steps each, each at the clip: fp16's gradients are unscaled before clipping
    assert len(norms.norms) == 4 and all(1e-3 * 0.99 <= n <= 1e-3 * 1.01 for n in norms.norms), norms.norms
    unclipped = _GradNorms()
    _fit(_module(grad_clip=None), _images(2), max_steps=2, precision=precision, callbacks=[unclipped])
    assert min(unclipped.norms) > 1e-2  # the clip is what bounded them


def test_resume_restores_both_optimizers_exactly(tmp_path: Path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.tiny_run import StopAfterSteps

    # One batch, twice per epoch: the data order cannot differ, whatever Lightning replays after a restart from
    # a plain list loader (visgen's data stream makes the order exact: tests/training).
    batches = _images(1) * 2  # an epoch = 2 generator steps: the checkpoint sits at an epoch boundary
    straight = _module()
    _fit(straight, batches, max_steps=4)
    saver = ModelCheckpoint(dirpath=tmp_path, filename="epoch_end", every_n_epochs=1, save_on_train_epoch_end=True)
    _fit(_module(), batches, max_steps=4, root=tmp_path, callbacks=[saver, StopAfterSteps(2)])  # a job killed at step 2
    ckpt = torch.load(tmp_path / "epoch_end.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2 and len(ckpt["optimizer_states"]) == 2
    assert ckpt["visgen"]["autoencoder_kind"] == "vq" and ckpt["visgen"]["autoencoder_config"]["num_codes"] == 32
    resumed = _module(seed=1)  # other initial weights: everything must come from the checkpoint
    trainer = _fit(resumed, batches, max_steps=4, ckpt=str(tmp_path / "epoch_end.ckpt"), root=tmp_path)
    assert trainer.global_step == 4
    for key, value in _state(straight).items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_a_few_steps_on_the_digits_lower_the_reconstruction_loss(digits_dir: Path):
    from visgen.data.stream import load_all

    images, labels = load_all(str(digits_dir / "digits" / "digits-train-{000000..000009}.tar"), 32)
    batches = [{"image": images[i: i + 32, :, 8:24, 8:24], "label": labels[i: i + 32]} for i in range(0, 32 * 30, 32)]
    module = _module(disc_start=10**6)
    module.optimizer_cfg["lr"] = 3e-3

    def rec_loss() -> float:
        with torch.no_grad():
            x = torch.cat([b["image"] for b in batches[:4]]).float() / 127.5 - 1
            return module.reconstruction_loss(module.net(x)[0], x)[0].item()

    start = rec_loss()
    _fit(module, batches, max_steps=30)
    assert rec_loss() < 0.5 * start


def test_kl_autoencoder_trains_with_its_kl_term(tmp_path: Path):
    module = _module("kl", adaptive_weight=True)
    _fit(module, _images(2), max_steps=2, root=tmp_path)
    recon, reg, parts, codes = module._reconstruct(module.net, torch.zeros(2, 3, 16, 16))
    assert codes is None and parts["kl"] > 0 and reg.item() == pytest.approx(1e-6 * parts["kl"].item())
    assert module.export(tmp_path).joinpath("config.json").is_file()  # a diffusers AutoencoderKL directory


def test_rfid_is_the_frechet_distance_of_all_validation_reconstructions(tmp_path: Path):
    from tests.eval.fakes import write_random_inception_weights
    from visgen.eval.inception import InceptionFeatures
    from visgen.eval.metrics import frechet_distance
    from visgen.sampling import to_uint8

    weights = str(write_random_inception_weights(tmp_path / "inception.pth"))
    module = _module()
    module.rfid_inception_weights, module.rfid_inception_sha256 = weights, None
    batches = _images(1, seed=3)  # 4 images: Inception at 299 px is the cost here
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, inference_mode=False)
    rfid = trainer.validate(module, DataLoader(batches, batch_size=None), verbose=False)[0]["val/rfid"]
    inception = InceptionFeatures(weights, expected_sha256=None, spatial=False)
    images = torch.cat([b["image"] for b in batches])
    with torch.no_grad():
        recon = to_uint8(module.ema(images.float() / 127.5 - 1)[0])
    expected = frechet_distance(inception(recon)["pool"], inception(images)["pool"])
    assert rfid == pytest.approx(expected, rel=1e-4)
