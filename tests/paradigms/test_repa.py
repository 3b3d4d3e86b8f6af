"""REPA's loss and module: the alignment term against a direct computation, flow + λ · alignment, a frozen encoder
outside the optimizer and the checkpoints, refusals, and a tiny end-to-end run of the demo preset."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from tests.tiny_run import TINY
from visgen.diffusion.interpolants import LinearInterpolant
from visgen.encoders.base import AlignmentEncoder
from visgen.nn.repa import REPASiT
from visgen.paradigms.repa import REPA, alignment_loss
from visgen.tokenizers.base import PixelTokenizer


class PatchEncoder(AlignmentEncoder):
    """A frozen random patchifier: (B, 3, S, S) -> (B, (S / patch)², dim). Stands in for DINOv2 in tests."""

    def __init__(self, image_size: int = 16, patch: int = 4, dim: int = 12, seed: int = 0, **_: object) -> None:
        torch.manual_seed(seed)
        super().__init__(nn.Conv2d(3, dim, patch, stride=patch), dim, "patch-test", "0" * 64, image_size)
        self.patch = patch

    @property
    def token_grid(self) -> int:
        return self.image_size // self.patch

    def preprocess(self, images: Tensor) -> Tensor:
        return images

    def patch_tokens(self, inputs: Tensor) -> Tensor:
        return self.frozen_net(inputs).flatten(2).transpose(1, 2)  # (B, N, D)


def build_module(net: nn.Module | None = None, encoders: list[AlignmentEncoder] | None = None, **kwargs) -> REPA:
    torch.manual_seed(0)
    net = net or REPASiT(input_size=16, patch_size=4, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                         num_classes=10, encoder_depth=1, z_dims=[12], projector_dim=16)
    return REPA(net=net, tokenizer=PixelTokenizer(), sampler=lambda *a, **k: None,
                optimizer={"lr": 1e-3, "weight_decay": 0.0}, image_size=16, batch_global=4,
                encoders=encoders if encoders is not None else [PatchEncoder()], **kwargs)


def a_batch(batch: int = 4) -> dict[str, Tensor]:
    images = torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return {"images": images, "latents": images, "labels": torch.arange(batch) % 10}


def test_alignment_loss_is_the_mean_negative_cosine_over_tokens_and_encoders():
    g = torch.Generator().manual_seed(0)
    projections = [torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 4, generator=g)]
    features = [torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 4, generator=g)]
    expected = torch.zeros(3)
    for z_tilde, z in zip(projections, features, strict=True):  # REPA loss.py, sample by sample, token by token
        for j in range(3):
            cos = [float(z_tilde[j, n] @ z[j, n] / (z_tilde[j, n].norm() * z[j, n].norm())) for n in range(5)]
            expected[j] -= sum(cos) / 5
    expected /= 2
    torch.testing.assert_close(alignment_loss(projections, features), expected)
    # scale-invariant in both arguments; an unnormalised dot product is not the loss
    torch.testing.assert_close(alignment_loss([3 * p for p in projections], [0.5 * f for f in features]), expected)
    raw = -sum((p * f).sum(-1).mean(1) for p, f in zip(projections, features, strict=True)) / 2
    assert not torch.allclose(raw, expected, atol=1e-2)
    with pytest.raises(ValueError, match="2 projections for 1 encoders"):
        alignment_loss(projections, features[:1])


def test_loss_is_the_flow_loss_plus_half_the_alignment_with_the_same_draws():
    module = build_module()
    net = module.net.eval()  # no label dropout: it draws from the global RNG
    batch = a_batch()
    total = module.loss(net, batch, torch.Generator().manual_seed(3))
    interpolant = LinearInterpolant()
    t, noise = interpolant.draw(batch["latents"], torch.Generator().manual_seed(3))
    x_t, velocity = interpolant.path(batch["latents"], noise, t)
    out, projections = net(x_t, t, batch["labels"], project=True)
    flow = (out - velocity).pow(2).flatten(1).mean(1)
    align = alignment_loss(projections, [module.encoders[0](batch["images"])])
    torch.testing.assert_close(total, flow + 0.5 * align)
    assert build_module(proj_coeff=0.0).loss(build_module().net.eval(), batch, torch.Generator().manual_seed(3)
                                              ).allclose(flow)


def test_the_encoder_is_frozen_outside_the_optimizer_and_the_checkpoint():
    module = build_module()
    encoder = module.encoders[0]
    module.train()
    assert not encoder.frozen_net.training and encoder.training  # the wrapper follows, the network stays in eval
    loss = module.loss(module.net, a_batch()).mean()
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in encoder.frozen_net.parameters())
    assert module.net.projectors[0][0].weight.grad is not None  # the projector does learn
    optimized = {id(p) for group in module.configure_optimizers()["optimizer"].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.net.parameters() if p.requires_grad}
    assert not optimized & {id(p) for p in encoder.frozen_net.parameters()}
    assert not any(k.startswith("encoders") for k in module.state_dict())
    assert set(module.state_dict()) == {f"{prefix}.{k}" for prefix in ("net", "ema") for k in module.net.state_dict()}
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["visgen"]["alignment_encoders"] == ["patch-test@sha256:0000000000000000"]
    module.to(torch.float64)  # the hidden network still follows .to()
    assert encoder.frozen_net.weight.dtype == torch.float64


def test_mismatched_nets_encoders_and_batches_are_refused_naming_the_setting():
    with pytest.raises(ValueError, match=r"z_dims=\[12\] but the encoders give features of width \[8\]"):
        build_module(encoders=[PatchEncoder(dim=8)])
    with pytest.raises(ValueError, match="2x2 token grid, the net 4x4"):
        build_module(encoders=[PatchEncoder(patch=8)])
    with pytest.raises(ValueError, match="time_convention=visgen"):
        build_module(interpolant=LinearInterpolant(prediction="data"))
    with pytest.raises(KeyError, match="keep_image=true"):
        build_module().loss(build_module().net, {"latents": torch.zeros(1, 3, 16, 16), "labels": torch.zeros(1).long()})


def test_demo_preset_trains_end_to_end_and_checkpoints_the_encoder_ids_only(tmp_path, digits_dir):
    from hydra import compose, initialize_config_dir

    from tests.tiny_run import CONF_DIR
    from visgen.eval.checkpoint import load_checkpoint, load_net
    from visgen.training.train import train

    overrides = [o for o in TINY if not o.startswith("experiment=")] + [
        "experiment=demo_repa", "trainer.max_steps=8", "model.net.encoder_depth=1",
        "model.encoders=[{_target_: tests.paradigms.test_repa.PatchEncoder, image_size: 32, dim: 12}]",
        "model.net.z_dims=[12]", f"paths.run_dir={tmp_path}", f"paths.data_dir={digits_dir}",
        f"paths.cache_dir={digits_dir / 'cache'}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    metrics = train(cfg)
    assert {"train/flow_loss", "train/proj_loss"} <= set(metrics)
    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert checkpoint["visgen"]["alignment_encoders"] == ["patch-test@sha256:0000000000000000"]
    assert not any("encoders" in k for k in checkpoint["state_dict"])
    assert isinstance(load_net(checkpoint), REPASiT)  # evaluation needs no encoder
