"""REPA's sampler in visgen's time: the same samples as an Euler-Maruyama written in REPA's own time (t = 1 noise,
v = ε − x), guidance exactly where REPA guides (t_repa <= 0.7), a float64 state around a float32 net."""

from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import Tensor, nn

from tests.tiny_run import CONF_DIR
from visgen.diffusion.samplers import guided_output_channels
from visgen.diffusion.sde import SDESampler
from visgen.nn.dit import DiT
from visgen.nn.repa import REPASiT


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny nets: one intra-op thread (OpenMP threads spin when other processes share the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def repa_sampler(**overrides) -> SDESampler:
    """conf/sampling/repa_sde.yaml, composed and built (no model node: the linear path, velocity)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("evaluate", overrides=["ckpt=none", "sampling=repa_sde",
                                             *(f"sampling.{k}={v}" for k, v in overrides.items())])
    return instantiate(cfg.sampling)


def tiny_repa_net() -> REPASiT:
    torch.manual_seed(0)
    net = REPASiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                  encoder_depth=1, z_dims=[8], projector_dim=16)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    return net.eval()


def euler_maruyama_in_repa_time(velocity, labels: Tensor, shape: tuple[int, ...], null: int, num_steps: int = 250,
                                cfg_scale: float = 1.8, guidance_high: float = 0.7) -> Tensor:
    """REPA's published sampler from its equations, in its time: x_t = (1 − t) x + t ε, the net's v = ε − x,
    score s = −(x_t + (1 − t) v) / t, reverse SDE dx = (v − t s) dt + sqrt(2 t) dW from t = 1 to 0.04 (float64
    state), then the drift's mean to t = 0; CFG on the drift where t <= guidance_high. Noise from the global RNG."""
    x = torch.randn(shape).to(torch.float64)  # the float32 prior, as generate.py draws it
    times = torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64).tolist() + [0.0]

    def drift(x: Tensor, t: float) -> Tensor:
        guided = cfg_scale > 1 and t <= guidance_high
        x_in = torch.cat([x, x]) if guided else x
        y = torch.cat([labels, torch.full_like(labels, null)]) if guided else labels
        v = velocity(x_in.float(), torch.full((len(x_in),), t), y).double()
        d = v - t * (-(x_in + (1 - t) * v) / t)
        if guided:
            cond, uncond = d.chunk(2)
            d = uncond + cfg_scale * (cond - uncond)
        return d

    for t, t_next in zip(times[:-2], times[1:-1], strict=True):
        z = torch.randn_like(x)
        x = x + drift(x, t) * (t_next - t) + math.sqrt(2 * t) * math.sqrt(t - t_next) * z
    return x + drift(x, times[-2]) * (times[-1] - times[-2])


def test_repa_sde_in_visgen_time_gives_the_samples_of_repas_own_time():
    net, labels, shape = tiny_repa_net(), torch.tensor([0, 3, 7]), (3, 4, 8, 8)
    sampler = repa_sampler(num_steps=40)  # REPA's 250 steps, fewer: the same grid rule linspace(1, 0.04, N)
    torch.manual_seed(5)
    ours = sampler(net, labels, shape[1:])
    torch.manual_seed(5)
    backbone = lambda x, t, y: DiT.forward(net, x, t, y)  # noqa: E731  the released weights' field: ε − x at t_repa
    theirs = euler_maruyama_in_repa_time(backbone, labels, shape, null=10, num_steps=40)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=2e-5)
    # the same weights read as a visgen-time field (no conversion at the edge) sample something else altogether
    unconverted = REPASiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                          num_classes=10, encoder_depth=1, z_dims=[8], projector_dim=16, time_convention="visgen")
    unconverted.load_state_dict(net.state_dict())
    torch.manual_seed(5)
    wrong = sampler(unconverted.eval(), labels, shape[1:])
    assert (wrong - theirs.float()).abs().max() > 0.5


class Recorder(nn.Module):
    """Records the times at which it was called with a doubled (guided) batch; predicts zero velocity."""

    num_classes = 10

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))  # float32: the dtype the state is cast to
        self.calls: list[tuple[float, bool, torch.dtype]] = []

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        self.calls.append((float(t[0]), bool((y == 10).any()), x.dtype))
        return torch.zeros_like(x)


def test_guidance_applies_exactly_where_repa_guides():
    net, labels = Recorder(), torch.tensor([1, 2])
    repa_sampler()(net, labels, (4, 4, 4))
    repa_times = torch.linspace(1.0, 0.04, 250, dtype=torch.float64)
    assert [guided for _, guided, _ in net.calls] == (repa_times <= 0.7).tolist()  # 250 calls, the last is the mean
    assert {dtype for *_, dtype in net.calls} == {torch.float32}  # the float64 state meets the net in its dtype
    # closed interval in visgen time: t = 0.3 (REPA's 0.7) and t = 1 are guided, just below 0.3 is not
    class NullIsOne(nn.Module):  # output t, plus 1 for the null label
        num_classes = 10

        def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
            return x + (y == 10).float().view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1)

    x = torch.zeros(3, 4, 2, 2)
    out = guided_output_channels(NullIsOne(), x, torch.tensor([0.3 - 1e-7, 0.3, 1.0]), torch.tensor([1, 1, 1]),
                                 cfg_scale=2.0, guidance_interval=(0.3, 1.0))
    guided = out[:, 0, 0, 0] - torch.tensor([0.3 - 1e-7, 0.3, 1.0])
    torch.testing.assert_close(guided, torch.tensor([0.0, -1.0, -1.0]))  # 2 · 0 − 1 · 1 where guided


def test_state_dtype_is_validated_and_keeps_the_prior_dtype_out():
    with pytest.raises(ValueError, match="state_dtype='float65'"):
        SDESampler(state_dtype="float65")
    net = Recorder()
    out = SDESampler(num_steps=5, state_dtype="float64")(net, torch.tensor([0]), (1, 2, 2))
    assert out.dtype == torch.float32 and {dtype for *_, dtype in net.calls} == {torch.float32}
