"""One rank of a tiny sampling job (a random conv net + CFG Heun sampler on 8x8 pixels), for the distributed tests.

    RANK=r WORLD_SIZE=w MASTER_ADDR=127.0.0.1 MASTER_PORT=p python sample_job_worker.py <out_dir> [seconds_per_chunk]
"""

import sys
import time

import torch

from visgen.diffusion.samplers import ODESampler
from visgen.eval.distributed import setup_ranks
from visgen.eval.sample_job import ChunkPlan, SampleJob, postprocess
from visgen.tokenizers.base import PixelTokenizer


class TinyNet(torch.nn.Module):
    """A class-conditional velocity net small enough to import and run in a second (no timm, no DiT)."""

    num_classes = 10

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(11, 3 * 8 * 8)  # + the null label for CFG
        self.body = torch.nn.Sequential(torch.nn.Conv2d(4, 16, 3, padding=1), torch.nn.SiLU(),
                                        torch.nn.Conv2d(16, 3, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t_map = t.view(-1, 1, 1, 1).expand(-1, 1, 8, 8)  # (B, 1, 8, 8)
        return self.body(torch.cat([x + self.embed(y).view(-1, 3, 8, 8), t_map], 1))  # (B, 3, 8, 8)


def main(out_dir: str, seconds_per_chunk: float = 0.0) -> None:
    torch.set_num_threads(1)  # every process the same math, whatever else runs on the machine
    ranks = setup_ranks("cpu")
    torch.manual_seed(0)
    net = TinyNet().eval()
    sampler, tokenizer = ODESampler(num_steps=6, cfg_scale=1.5), PixelTokenizer()

    def sample_fn(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        time.sleep(seconds_per_chunk)  # lets the kill test stop the job in the middle
        latents = sampler(net, labels, tokenizer.latent_shape(8), generator=generator)
        return postprocess(tokenizer.decode(latents), "round_half_up")

    def features(images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mean": images.float().mean((2, 3))}  # (n, 3): a stand-in extractor

    plan = ChunkPlan(num_samples=40, chunk_size=3, seed=7, num_classes=10, labels="uniform")
    job = SampleJob(out_dir, plan, {"net": "TinyNet, seed 0"})
    job.prepare(ranks)
    job.run(ranks, sample_fn, {"stand_in": features}, progress=False)
    if ranks.is_main:
        job.write_samples_npz()
    ranks.close()


if __name__ == "__main__":
    main(sys.argv[1], *(float(a) for a in sys.argv[2:3]))
