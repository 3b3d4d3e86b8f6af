"""Inception-v3 features as the ADM evaluator's TensorFlow graph makes them, through torch-fidelity's port.

The network is torch-fidelity's `inception-v3-compat` (`FeatureExtractorInceptionV3`): the 2015-12-05 TF graph's
weights, converted, with TF1's exact bilinear resize. Clusters are offline, so the weights come from a local file,
`weights-inception-2015-12-05-6726825d.pth` (torch-fidelity's v0.2.0 release; `INCEPTION_SHA256`), checked by
its SHA-256 and read with `weights_only=True` before torch-fidelity sees the bytes.

The image path (unchanged from the TF graph; tested): uint8 (B, 3, H, W) in, cast to float32, the network's own
TF1-exact bilinear resize to 299 × 299 (what the graph does after its `ExpandDims` input, where the ADM evaluator
feeds images), (x − 128) / 128, the network. Nothing is resized, cropped, or rounded before: samples go in
exactly as stored in `samples.npz`. It runs in float32 with TF32 and autocast off (TF32 convolutions on Ampere
GPUs change the features).

Features (all float32):
    pool     (B, 2048)  `pool_3:0`: FID, precision/recall
    logits   (B, 1008)  pool × the softmax weights, no bias (the ADM evaluator's softmax graph): Inception Score
    spatial  (B, 2023)  `mixed_6/conv:0`[..., :7] flattened in NHWC order: sFID. torch-fidelity's converter maps the
                        TF scope `mixed_6/conv` to `Mixed_6d.branch1x1` (conv, batch norm, ReLU); its output is taken
                        with a forward hook on the same network, first 7 of 192 channels, 17 × 17 positions.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["InceptionFeatures", "INCEPTION_WEIGHTS_FILE", "INCEPTION_SHA256", "exact_float32", "check_uint8_images"]

#: The file users supply (torch-fidelity's release asset; pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`
#: holds the same bytes).
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
#: torch-fidelity publishes the prefix 6726825d in the file name (torch.hub's `<name>-<sha256 prefix>` rule, in
#: torch_fidelity/feature_extractor_inceptionv3.py, URL_INCEPTION_V3); the full hash (95,628,359 bytes) is the one
#: independent projects pin for this file and for pytorch-fid's copy.
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
SPATIAL_CHANNELS = 7  # ADM evaluator: spatial[..., :7]


@contextmanager
def exact_float32(device_type: str = "cpu") -> Iterator[None]:
    """float32 math without TF32 (matmul and cuDNN) and without autocast; restores the settings after."""
    matmul_precision = torch.get_float32_matmul_precision()
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(matmul_precision)
        torch.backends.cudnn.allow_tf32 = cudnn_tf32


def check_uint8_images(images: Tensor, where: str) -> None:
    """Feature extractors take the stored pixels: uint8 (B, 3, H, W)."""
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        what = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{where}: got {what}; expected uint8 images (B, 3, H, W) as stored in samples.npz (the "
                         "network resizes them itself; convert floats with visgen.eval.sample_job.quantize)")


class InceptionFeatures(nn.Module):
    """torch-fidelity's TF-compatible Inception-v3 from a local weights file: pool, logits and spatial features."""

    def __init__(self, weights_path: str | Path, expected_sha256: str | None = INCEPTION_SHA256,
                 spatial: bool = True) -> None:
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"Inception weights {path} do not exist; download torch-fidelity's {INCEPTION_WEIGHTS_FILE} "
                f"(sha256 {INCEPTION_SHA256}) once where the network is reachable and set "
                "metrics.inception_weights=<path> (see the README, 'Reproduce a paper's FID')")
        data = path.read_bytes()
        self.sha256 = hashlib.sha256(data).hexdigest()
        if expected_sha256 and self.sha256 != expected_sha256:
            raise ValueError(
                f"Inception weights {path} have sha256 {self.sha256}, not {expected_sha256} "
                f"({INCEPTION_WEIGHTS_FILE}); numbers from other weights are not comparable with published FIDs. "
                "Use the right file, or set metrics.inception_sha256=null to accept these weights knowingly")
        try:  # only tensors and containers: the same bytes then hold no code when torch-fidelity reads them
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"Inception weights {path} are not a plain state dict ({type(err).__name__}: {err})"
                             ) from err
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=io.BytesIO(data))
        self.net.eval().requires_grad_(False)
        self.spatial = spatial
        self._spatial_out: Tensor | None = None
        if spatial:
            self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)
        self.id = f"torch-fidelity inception-v3-compat, {path.name} (sha256 {self.sha256})"

    def _keep_spatial(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        self._spatial_out = output  # (B, 192, 17, 17)

    @torch.no_grad()
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """uint8 (B, 3, H, W) -> {"pool": (B, 2048), "logits": (B, 1008), "spatial": (B, 2023)} float32."""
        check_uint8_images(images, "InceptionFeatures")
        device = next(self.net.parameters()).device
        with exact_float32(device.type):
            pool, logits = self.net(images.to(device))  # (B, 2048), (B, 1008)
        feats = {"pool": pool.float(), "logits": logits.float()}
        if self.spatial:
            spatial = self._spatial_out[:, :SPATIAL_CHANNELS]  # (B, 7, 17, 17)
            feats["spatial"] = spatial.permute(0, 2, 3, 1).reshape(len(images), -1).float()  # (B, 2023) NHWC
            self._spatial_out = None
        return feats
