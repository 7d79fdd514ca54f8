"""The PyTorch peers of `compare_pytorch.py`: the model, a train step and a PC sampler for
score_sde_pytorch's NCSN++ (the port in `torch_ncsnpp.py`) and for diffusers' `UNet2DModel`
in its closest NCSN++ configuration.

The train step is the reference's: VE continuous denoising score matching (Eq. 7, loss
||sigma s(x + sigma z, sigma) + z||^2 halved and summed per example, averaged over the batch),
Adam (lr 2e-4, eps 1e-8), global-norm clipping at 1 and an EMA of the parameters. Sampling is
the PC sampler with the reverse-diffusion predictor and the Langevin corrector (snr 0.16).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch_ncsnpp

PEERS = ("score_sde_pytorch", "diffusers")


def make_model(peer: str, config):
    """The peer's network for `config` (CIFAR-10 NCSN++ continuous), in train mode."""
    if peer == "score_sde_pytorch":
        return torch_ncsnpp.NCSNpp(config.model, image_size=config.data.image_size,
                                   channels=config.data.num_channels,
                                   centered=config.data.centered)
    if peer == "diffusers":
        from diffusers import UNet2DModel

        m = config.model
        # diffusers' NCSN++ port (its score_sde_ve checkpoints): FIR skip blocks with
        # Fourier time features; it has no residual input pyramid, so its count differs.
        return _DiffusersScore(UNet2DModel(
            sample_size=config.data.image_size, in_channels=config.data.num_channels,
            out_channels=config.data.num_channels, layers_per_block=m.num_res_blocks,
            block_out_channels=tuple(m.nf * c for c in m.ch_mult),
            down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D", "SkipDownBlock2D",
                              "SkipDownBlock2D"),
            up_block_types=("SkipUpBlock2D", "SkipUpBlock2D", "AttnSkipUpBlock2D",
                            "SkipUpBlock2D"),
            time_embedding_type="fourier", act_fn="silu", norm_eps=1e-6,
            mid_block_scale_factor=math.sqrt(2.0), downsample_padding=1, flip_sin_to_cos=True,
            freq_shift=1))
    raise ValueError(f"Unknown peer {peer!r}; valid: {list(PEERS)}.")


class _DiffusersScore(torch.nn.Module):
    """UNet2DModel called as score(x, sigma), as diffusers' ScoreSdeVePipeline calls it."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, sigma):
        return self.unet(x, sigma).sample


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _sigma(t, sigma_min, sigma_max):
    return sigma_min * (sigma_max / sigma_min) ** t


def make_train_step(model, config):
    """step(x [B, C, H, W]) -> loss, one optimizer step with clipping and EMA."""
    m, optim = config.model, config.optim
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=optim.lr, betas=(optim.beta1, 0.999), eps=optim.eps)
    ema = [p.detach().clone() for p in params]
    rate = m.ema_rate

    def step(x):
        model.train()
        t = torch.rand(x.shape[0]) * (1.0 - 1e-5) + 1e-5
        sigma = _sigma(t, m.sigma_min, m.sigma_max)
        z = torch.randn_like(x)
        score = model(x + sigma[:, None, None, None] * z, sigma)
        losses = 0.5 * torch.square(score * sigma[:, None, None, None] + z).flatten(1).sum(1)
        loss = losses.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if optim.grad_clip >= 0:
            torch.nn.utils.clip_grad_norm_(params, max_norm=optim.grad_clip)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - rate)
        return float(loss.detach())

    return step


def make_forward(model, config):
    """forward(x [B, C, H, W]) with eval-mode semantics and no autograd."""
    m = config.model

    def forward(x):
        model.eval()
        sigma = torch.linspace(m.sigma_min, m.sigma_max, x.shape[0])
        with torch.no_grad():
            return model(x, sigma)

    return forward


def make_pc_sampler(model, config, n_steps: int, snr: float = 0.16):
    """sample(batch) -> images: VE reverse-diffusion predictor + one Langevin corrector step
    per noise level, `n_steps` levels, as score_sde's PC sampler."""
    m = config.model
    c, s = config.data.num_channels, config.data.image_size
    sigmas = torch.tensor(np.exp(np.linspace(np.log(m.sigma_min), np.log(m.sigma_max), n_steps)),
                          dtype=torch.float32)

    def norm(v):
        return v.flatten(1).norm(dim=1).mean()

    def sample(batch):
        model.eval()
        with torch.no_grad():
            x = torch.randn(batch, c, s, s) * m.sigma_max
            timesteps = torch.linspace(1.0, 1e-5, n_steps)
            for t in timesteps:
                sigma = _sigma(t, m.sigma_min, m.sigma_max).repeat(batch)
                # Langevin corrector.
                score = model(x, sigma)
                z = torch.randn_like(x)
                eps = 2 * (snr * norm(z) / norm(score)) ** 2
                x = x + eps * score + torch.sqrt(2 * eps) * z
                # Reverse-diffusion predictor on the discrete VE chain.
                i = int(t * (n_steps - 1))
                sig, prev = sigmas[i], (sigmas[i - 1] if i > 0 else torch.tensor(0.0))
                g2 = sig ** 2 - prev ** 2
                x_mean = x + g2 * model(x, sigma)
                x = x_mean + torch.sqrt(g2) * torch.randn_like(x)
            return x_mean

    return sample
