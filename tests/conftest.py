"""Shared test fixtures: a tiny random (but non-trivial) DiT world-model bundle built in well under 2 s."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dit_envs.bundle import save_bundle
from dit_envs.models.autoencoder import AUTOENCODER_PRESETS
from dit_envs.models.dit import DiTConfig
from dit_envs.models.dit_world_model import DiTWorldModel
from dit_envs.models.heads import HeadsConfig

PONG_ACTIONS = ["NOOP", "FIRE", "RIGHT", "LEFT", "RIGHTFIRE", "LEFTFIRE"]
_DIT_FIELDS = {"width", "depth", "heads", "mlp_ratio", "freq_dim", "action_cond"}


def random_frames(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` Pong-like uint8 frames ``(n, 3, 64, 64)``: brown background, two paddles, a 1-px ball."""
    frames = torch.empty(n, 3, 64, 64, dtype=torch.uint8)
    frames[:] = torch.tensor([144, 72, 17], dtype=torch.uint8)[:, None, None]
    ys = torch.randint(8, 50, (n, 3), generator=generator)
    bx = torch.randint(10, 54, (n,), generator=generator)
    for i in range(n):
        frames[i, :, ys[i, 0] : ys[i, 0] + 6, 6:8] = torch.tensor([213, 130, 74], dtype=torch.uint8)[:, None, None]
        frames[i, :, ys[i, 1] : ys[i, 1] + 6, 56:58] = torch.tensor([92, 186, 92], dtype=torch.uint8)[:, None, None]
        frames[i, :, ys[i, 2], bx[i]] = 236
    return frames


def _perturb(module: torch.nn.Module, scale: float, generator: torch.Generator) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))


@torch.no_grad()
def _calibrate_heads(model: DiTWorldModel, z0: torch.Tensor, a0: torch.Tensor, reward_rate: float,
                     term_rate: float, generator: torch.Generator) -> None:
    """Bias the (perturbed) head so that, on transitions of the model's own rollouts, P(reward ≠ 0) ≈
    ``reward_rate`` and P(terminated) ≈ ``term_rate``; non-zero rewards sit near ±1 (the Pong values)."""
    heads, out = model.heads, model.heads.out
    state, trans = model.initial_state(z0, a0), []
    for _ in range(4):  # transitions of the model's own rollouts (the head does not affect them)
        action = torch.randint(0, model.num_actions, (z0.shape[0],), generator=generator)
        z_last = state["z"][:, -1]
        state, z_next, _, _ = model.step(state, action, generator)
        trans.append((z_last, action, z_next))
    z, a, zn = (torch.cat(x) for x in zip(*trans))
    h = heads.mlp(torch.cat([z, torch.nn.functional.one_hot(a, model.num_actions).float(), zn], -1))
    zb = heads.zero_bin
    two_hot = heads.twohot.encode(torch.tensor([1.0, -1.0]))  # (2, num_bins): the +1 and -1 targets
    u = 2.0 * torch.randn(h.shape[1], generator=generator)
    lo_hi = torch.quantile(h @ u, torch.tensor([reward_rate / 2, 1.0 - reward_rate / 2]))
    mid = lo_hi.mean()  # events are the large |u·h − mid|: both tails, so both signs occur
    w, b = torch.zeros_like(out.weight), torch.full_like(out.bias, -30.0)
    for sign, row in ((1.0, two_hot[0]), (-1.0, two_hot[1])):  # sign of u·h − median picks +1 or -1
        on = (row > 0).nonzero()[:, 0]
        w[on], b[on] = sign * u, row[on].log() - sign * mid
    b[zb] = 0.0
    w[-1], b[-1] = 0.5 * torch.randn(h.shape[1], generator=generator), 0.0
    out.weight.copy_(w)
    out.bias.copy_(b)
    r_logits, t_logit = heads(z, a, zn)
    rest = torch.cat([r_logits[:, :zb], r_logits[:, zb + 1 :]], dim=1).logsumexp(-1)
    margin = rest - r_logits[:, zb]  # reward event iff margin > zero-bin bias
    out.bias[zb] = torch.quantile(margin, 1.0 - reward_rate)
    out.bias[-1] = -torch.quantile(t_logit, 1.0 - term_rate)


def make_tiny_bundle(
    path: str | Path, *, game: str = "Pong", num_actions: int = 6, context_len: int = 4, seed: int = 0, **overrides
) -> Path:
    """Build and save a tiny random :class:`DiTWorldModel` bundle (d_z = 2·4·4 = 32, D = 32, depth 2).

    Weights are perturbed away from the zero-init so rollouts are non-trivial, and the head is calibrated on
    the model's own rollouts so that P(reward ≠ 0) ≈ 5 % and P(terminated) ≈ 1 % per step.

    Args:
        path: bundle directory to write.
        game, num_actions, context_len, seed: identity and RNG seed (same seed → identical files).
        overrides: ``sampling_steps`` (2), ``num_start_contexts`` (8), ``dtype`` (torch.float32), ``card``,
            ``overwrite`` (False), ``action_meanings``, ``reward_rate`` (0.05), ``term_rate`` (0.01), or any
            :class:`DiTConfig` size field (``width``, ``depth``, ``heads``, ...).
    Returns:
        ``Path(path)``.
    Raises:
        TypeError: an unknown override.
    """
    opts = dict(sampling_steps=2, num_start_contexts=8, dtype=torch.float32, card="", overwrite=False,
                action_meanings=None, reward_rate=0.05, term_rate=0.01)
    unknown = set(overrides) - set(opts) - _DIT_FIELDS
    if unknown:
        raise TypeError(f"make_tiny_bundle: unknown overrides {sorted(unknown)}")
    opts.update({k: v for k, v in overrides.items() if k in opts})
    dit_kw = {k: v for k, v in overrides.items() if k in _DIT_FIELDS}
    ae_cfg = AUTOENCODER_PRESETS["tiny"]
    d = ae_cfg.latent_dim
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DiTWorldModel.build(
            ae_cfg,
            DiTConfig.from_preset("tiny", latent_dim=d, num_actions=num_actions, context_len=context_len, **dit_kw),
            HeadsConfig(latent_dim=d, num_actions=num_actions, hidden=32, layers=1, num_bins=31, low=-5.0, high=5.0),
            sampling_steps=opts["sampling_steps"],
        ).eval()
    _perturb(model.dit, 0.1, g)
    _perturb(model.heads.mlp, 0.1, g)
    m = opts["num_start_contexts"]
    z = model.encode(random_frames(m * context_len + 64, g))
    model.set_latent_stats(z.mean(0), z.std(0).clamp(min=1e-3))
    start_z = z[: m * context_len].reshape(m, context_len, d)
    start_a = torch.randint(0, num_actions + 1, (m, context_len), generator=g)
    start_a[:, 0] = num_actions  # the first frame of an episode follows the null action
    idx = torch.randint(0, m, (128,), generator=g)
    _calibrate_heads(model, start_z[idx], start_a[idx], opts["reward_rate"], opts["term_rate"], g)
    meanings = opts["action_meanings"] or (
        PONG_ACTIONS if num_actions == 6 else [f"ACTION_{i}" for i in range(num_actions)]
    )
    return save_bundle(
        model, path, game=game, action_meanings=meanings, start_z=start_z, start_a=start_a,
        card=opts["card"], dtype=opts["dtype"], overwrite=opts["overwrite"],
    )


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a tiny random Pong bundle (6 actions, K = 4, d_z = 32), built once per test session."""
    return make_tiny_bundle(tmp_path_factory.mktemp("bundles") / "Pong-tiny")


@pytest.fixture(scope="session")
def tiny_stage1_store(tmp_path_factory) -> Path:
    """A tiny real-Pong store with stage-1 artifacts (tiny autoencoder, d_z 32), built in a few seconds."""
    from trainers.collect import Args as CollectArgs, main as collect

    out = tmp_path_factory.mktemp("stage1") / "store"
    assert collect(CollectArgs(agent="rssm", size="tiny", num_envs=2, prefill=64, ae_steps=8, train_every=16,
                               checkpoint_every=96, chunk_rows=64, steps=192, out=str(out))) == 0
    return out


@pytest.fixture(scope="session")
def teacher_bundle(tiny_stage1_store, tmp_path_factory) -> Path:
    """A tiny DiT teacher bundle: 6 pretraining steps on :func:`tiny_stage1_store`."""
    from trainers.pretrain import Args as PretrainArgs, main as pretrain

    out = tmp_path_factory.mktemp("teacher")
    assert pretrain(PretrainArgs(data=str(tiny_stage1_store), out=str(out), steps=6, preset="tiny", batch=8,
                                 warmup=2, eval_every=0, start_contexts=8, eval_windows=8, eval_horizon=6,
                                 threads=1)) == 0
    return out / "bundle"

