"""DreamerV3 actor-critic whose observation is the stack of the last K frozen-autoencoder latents.

Source: Hafner et al. 2023, "Mastering Diverse Domains through World Models" (DreamerV3), §2 "Actor critic
learning": λ-returns over imagined trajectories, a two-hot symlog critic regularised towards a slow EMA copy,
REINFORCE advantages divided by ``max(1, S)`` with ``S`` the EMA of the 5th–95th percentile range of returns, an
entropy bonus η = 3·10⁻⁴, and 1% unimix on the policy.

The input is ``obs`` float32 ``(B, K·d_z)`` (flattened ``WorldModel.latent_history``), not RSSM features, so one
policy runs in the RSSM's imagination, the DiT's, and the real game through the encoder.

Time-major trajectory convention (``T`` imagined steps, ``B`` parallel rollouts): ``obs[t]`` is the observation
of state ``s_t`` for ``t = 0..T``; ``actions[t]`` is taken at ``s_t``; ``rewards[t]`` and ``continues[t]`` belong
to the transition ``s_t → s_{t+1}`` (``continues[t] = 0`` when ``s_{t+1}`` is terminal); ``values[t] = V(s_t)``.
The RL math is pure functions; :class:`ActorCritic` only bundles the networks and calls them.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from dit_envs.models.distributions import TwoHotSymlog
from dit_envs.models.dreamer_layers import MLP, categorical_entropy, unimix_logits
from dit_envs.models.world_model import State, WorldModel

Metrics = dict[str, torch.Tensor]


@dataclasses.dataclass
class AgentConfig:
    """Actor-critic sizes and DreamerV3 hyper-parameters, saved as plain JSON in checkpoints."""

    obs_dim: int  # K·d_z
    num_actions: int
    hidden: int = 512  # DreamerV3 size S
    layers: int = 2
    unimix: float = 0.01
    num_bins: int = 255
    gamma: float = 0.997  # 1 − 1/333 (DreamerV3 "horizon" 333)
    lam: float = 0.95
    entropy_coef: float = 3e-4
    slow_fraction: float = 0.02  # slow critic EMA rate per update
    slow_reg: float = 1.0  # weight of the critic's regulariser towards the slow critic
    horizon: int = 15  # imagination length
    lr: float = 3e-5  # DreamerV3 actor and critic Adam lr (eps 1e-5, grad-norm clip 100)


def _check(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


class Actor(nn.Module):
    """Policy MLP: ``obs (..., obs_dim)`` → unimix log-probabilities ``(..., num_actions)`` (float32).

    Args:
        obs_dim: ``K·d_z``. num_actions: discrete actions. hidden, layers: MLP size. unimix: uniform mix (0.01).
    """

    def __init__(self, obs_dim: int, num_actions: int, hidden: int = 512, layers: int = 2,
                 unimix: float = 0.01) -> None:
        super().__init__()
        self.obs_dim, self.num_actions, self.unimix = obs_dim, num_actions, unimix
        self.net = MLP(obs_dim, num_actions, hidden, layers)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if obs.shape[-1] != self.obs_dim:
            raise ValueError(f"obs: expected last dim {self.obs_dim} (K*d_z), got shape {tuple(obs.shape)}")
        return unimix_logits(self.net(obs.float()), self.unimix)  # (..., A)

    @torch.no_grad()
    def act(self, obs: torch.Tensor, generator: torch.Generator | None = None, greedy: bool = False) -> torch.Tensor:
        """Sample (or, ``greedy``, take the argmax of) the policy: ``obs (B, obs_dim)`` → int64 ``(B,)``."""
        logits = self(obs)
        if greedy:
            return logits.argmax(-1)
        return torch.multinomial(logits.softmax(-1).reshape(-1, self.num_actions), 1,
                                 generator=generator).reshape(logits.shape[:-1])


class Critic(nn.Module):
    """Value MLP: ``obs (..., obs_dim)`` → two-hot symlog logits ``(..., num_bins)``; zero-init output (V ≡ 0)."""

    def __init__(self, obs_dim: int, hidden: int = 512, layers: int = 2, num_bins: int = 255) -> None:
        super().__init__()
        self.obs_dim = obs_dim
        self.net = MLP(obs_dim, num_bins, hidden, layers, zero_init_out=True)
        self.twohot = TwoHotSymlog(num_bins)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if obs.shape[-1] != self.obs_dim:
            raise ValueError(f"obs: expected last dim {self.obs_dim} (K*d_z), got shape {tuple(obs.shape)}")
        return self.net(obs.float()).float()  # (..., bins)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        """Expected return ``(...)`` float32 (symexp of the two-hot mean)."""
        return self.twohot.mean(self(obs))


def lambda_returns(rewards: torch.Tensor, values: torch.Tensor, continues: torch.Tensor, gamma: float,
                   lam: float) -> torch.Tensor:
    """TD(λ) returns of DreamerV3 (eq. 7), computed backwards.

    ``R_t = r_t + γ·c_t·((1−λ)·v_{t+1} + λ·R_{t+1})`` for ``t = T−1..0`` with the bootstrap ``R_T = v_T``.
    Index convention: ``r_t = rewards[t]`` and ``c_t = continues[t]`` belong to the transition ``s_t → s_{t+1}``
    (``c_t = 0`` cuts everything after a terminal ``s_{t+1}``); ``v_t = values[t] = V(s_t)``.

    Args:
        rewards, continues: float ``(T, B)``. values: float ``(T+1, B)``. gamma, lam: in ``[0, 1]``.
    Returns:
        float ``(T, B)``: ``R_0..R_{T−1}`` (``R_T`` is not returned).
    Raises:
        ValueError: mismatched shapes or ``gamma``/``lam`` outside ``[0, 1]``.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards: expected shape (T, B), got {tuple(rewards.shape)}")
    t_len, b = rewards.shape
    _check("values", values, (t_len + 1, b))
    _check("continues", continues, (t_len, b))
    for name, v in (("gamma", gamma), ("lam", lam)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name}: expected a value in [0, 1], got {v}")
    ret = values[-1]
    out = []
    for t in reversed(range(t_len)):
        ret = rewards[t] + gamma * continues[t] * ((1.0 - lam) * values[t + 1] + lam * ret)
        out.append(ret)
    return torch.stack(out[::-1])


def trajectory_weights(continues: torch.Tensor, gamma: float) -> torch.Tensor:
    """Loss weight of each imagined state: ``w_0 = 1``, ``w_t = Π_{i<t} γ·c_i`` (zero after a termination).

    Args:
        continues: float ``(T, B)``. Returns: float ``(T, B)``, weights of states ``s_0..s_{T−1}`` (DreamerV3).
    """
    disc = gamma * continues
    return torch.cat([torch.ones_like(disc[:1]), torch.cumprod(disc[:-1], 0)], 0)


class ReturnNormalizer(nn.Module):
    """Return scale of DreamerV3: ``S = EMA(Per(R, 95) − Per(R, 5))``, divide advantages by ``max(1, S)``.

    The 5th/95th percentiles (``torch.quantile``, linear interpolation) are tracked as two EMAs starting at 0
    (the EMA of their difference equals the difference of the EMAs). Buffers go into ``state_dict`` (safetensors).

    Args:
        decay: EMA decay (0.99). low, high: percentiles as fractions (0.05, 0.95). min_scale: floor of the
            scale (1.0: small returns are not amplified).
    """

    def __init__(self, decay: float = 0.99, low: float = 0.05, high: float = 0.95, min_scale: float = 1.0) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay: expected a value in [0, 1), got {decay}")
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"low/high: expected 0 <= low < high <= 1, got low={low}, high={high}")
        self.decay, self.q, self.min_scale = decay, (low, high), min_scale
        self.register_buffer("low", torch.zeros(()))
        self.register_buffer("high", torch.zeros(()))

    @torch.no_grad()
    def update(self, returns: torch.Tensor) -> None:
        """Fold the percentiles of ``returns`` (any shape, ≥ 1 element) into the EMAs."""
        if returns.numel() == 0:
            raise ValueError("returns: expected at least one element, got an empty tensor")
        q = torch.quantile(returns.detach().float().flatten(), torch.tensor(self.q, device=returns.device))
        self.low.mul_(self.decay).add_((1.0 - self.decay) * q[0])
        self.high.mul_(self.decay).add_((1.0 - self.decay) * q[1])

    def scale(self) -> torch.Tensor:
        """``max(min_scale, high − low)``, a float32 scalar tensor."""
        return torch.clamp(self.high - self.low, min=self.min_scale)


def action_log_prob(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """``log π(a|s)`` of the taken actions: logits ``(..., A)``, int64 actions ``(...)`` → ``(...)``."""
    return logits.log_softmax(-1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)


def actor_loss(logits: torch.Tensor, actions: torch.Tensor, returns: torch.Tensor, values: torch.Tensor,
               weights: torch.Tensor, scale: torch.Tensor | float, entropy_coef: float = 3e-4
               ) -> tuple[torch.Tensor, Metrics]:
    """REINFORCE with normalised advantages and an entropy bonus (DreamerV3 eq. 11).

    ``loss = −mean_{t,b} w_t·(log π(a_t|s_t)·sg((R_t − v_t)/scale) + η·H[π(·|s_t)])``.

    Args:
        logits: ``(T, B, A)`` policy log-probabilities at ``s_0..s_{T−1}``. actions: int64 ``(T, B)``.
        returns: λ-returns ``(T, B)``. values: ``V(s_t)`` ``(T, B)`` (baseline). weights: ``(T, B)``.
        scale: return scale ``max(1, S)``. entropy_coef: η.
    Returns:
        ``(loss, metrics)`` with detached scalars ``actor_loss``, ``actor_ent``, ``adv_mean``, ``adv_abs``.
    Raises:
        ValueError: mismatched shapes.
    """
    t_len, b, _ = logits.shape
    for name, x in (("actions", actions), ("returns", returns), ("values", values), ("weights", weights)):
        _check(name, x, (t_len, b))
    logp_a = action_log_prob(logits, actions)  # (T, B)
    ent = categorical_entropy(logits)  # (T, B)
    adv = ((returns - values) / scale).detach()  # (T, B)
    w = weights.detach()
    loss = -(w * (logp_a * adv + entropy_coef * ent)).mean()
    return loss, {"actor_loss": loss.detach(), "actor_ent": ent.detach().mean(), "adv_mean": adv.mean(),
                  "adv_abs": adv.abs().mean()}


def critic_loss(logits: torch.Tensor, returns: torch.Tensor, slow_values: torch.Tensor, weights: torch.Tensor,
                twohot: TwoHotSymlog, slow_reg: float = 1.0) -> tuple[torch.Tensor, Metrics]:
    """Two-hot symlog cross-entropy to the λ-returns plus ``slow_reg`` × the same towards the slow critic.

    Args:
        logits: critic logits ``(T, B, num_bins)`` at ``s_0..s_{T−1}``. returns, slow_values, weights: ``(T, B)``.
        twohot: the critic's :class:`TwoHotSymlog`. slow_reg: regulariser weight (DreamerV3: 1).
    Returns:
        ``(loss, metrics)``: scalar ``mean_{t,b} w_t·(CE(R_t) + slow_reg·CE(v^slow_t))``; detached
        ``critic_loss``, ``value_mean``, ``return_mean``.
    Raises:
        ValueError: mismatched shapes.
    """
    t_len, b, _ = logits.shape
    for name, x in (("returns", returns), ("slow_values", slow_values), ("weights", weights)):
        _check(name, x, (t_len, b))
    ce = twohot.loss(logits, returns.detach()) + slow_reg * twohot.loss(logits, slow_values.detach())  # (T, B)
    loss = (weights.detach() * ce).mean()
    return loss, {"critic_loss": loss.detach(), "value_mean": twohot.mean(logits.detach()).mean(),
                  "return_mean": returns.detach().mean()}


@dataclasses.dataclass
class Trajectory:
    """An imagined (or real) trajectory, time-major; see the module docstring for the index convention.

    Fields: ``obs`` float32 ``(T+1, B, obs_dim)``, ``actions`` int64 ``(T, B)``, ``rewards`` float32 ``(T, B)``,
    ``continues`` float32 ``(T, B)`` (``1 − terminated``).
    """

    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    continues: torch.Tensor

    def to(self, device: torch.device | str) -> "Trajectory":
        return Trajectory(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


def actor_critic_loss(actor: Actor, critic: Critic, slow_critic: Critic, traj: Trajectory,
                      normalizer: ReturnNormalizer, gamma: float = 0.997, lam: float = 0.95,
                      entropy_coef: float = 3e-4, slow_reg: float = 1.0, update_normalizer: bool = True
                      ) -> tuple[torch.Tensor, Metrics]:
    """DreamerV3 actor + critic loss on one trajectory (values and returns from the fast critic).

    Side effect: when ``update_normalizer``, ``normalizer.update(returns)`` runs before the scale is read
    (DreamerV3 order). Gradients reach only ``actor`` and ``critic``.

    Args:
        traj: :class:`Trajectory` with ``T`` steps and batch ``B``. Others: see :class:`AgentConfig`.
    Returns:
        ``(actor_loss + critic_loss, metrics)`` with detached scalars of both plus ``return_scale``.
    Raises:
        ValueError: trajectory fields of mismatched shapes.
    """
    t_len, b = traj.actions.shape
    _check("traj.obs", traj.obs, (t_len + 1, b, actor.obs_dim))
    critic_logits = critic(traj.obs)  # (T+1, B, bins)
    values = critic.twohot.mean(critic_logits).detach()  # (T+1, B)
    with torch.no_grad():
        slow_values = slow_critic.value(traj.obs[:-1])  # (T, B)
    returns = lambda_returns(traj.rewards.float(), values, traj.continues.float(), gamma, lam)  # (T, B)
    weights = trajectory_weights(traj.continues.float(), gamma)  # (T, B)
    if update_normalizer:
        normalizer.update(returns)
    scale = normalizer.scale()
    a_loss, a_metrics = actor_loss(actor(traj.obs[:-1]), traj.actions, returns, values[:-1], weights, scale,
                                   entropy_coef)
    c_loss, c_metrics = critic_loss(critic_logits[:-1], returns, slow_values, weights, critic.twohot, slow_reg)
    return a_loss + c_loss, {**a_metrics, **c_metrics, "return_scale": scale.detach()}


@torch.no_grad()
def imagine(world_model: WorldModel, actor: Actor, start: State, horizon: int,
            generator: torch.Generator | None = None) -> Trajectory:
    """Roll ``actor`` for ``horizon`` steps in any :class:`WorldModel` from ``start`` (no gradients: REINFORCE).

    Rollouts continue past a predicted termination; :func:`trajectory_weights` zeroes those steps.

    Args:
        start: world-model state with ``N`` rows. horizon: ``T`` ≥ 1. generator: drives the policy and the model.
    Returns:
        :class:`Trajectory` with ``obs (T+1, N, K·d_z)``.
    Raises:
        ValueError: ``horizon`` < 1.
    """
    if horizon < 1:
        raise ValueError(f"horizon: expected >= 1, got {horizon}")
    state = start
    obs = [world_model.latent_history(state).flatten(1)]
    actions, rewards, continues = [], [], []
    for _ in range(horizon):
        action = actor.act(obs[-1], generator)
        state, _, reward, terminated = world_model.step(state, action, generator)
        obs.append(world_model.latent_history(state).flatten(1))
        actions.append(action)
        rewards.append(reward.float())
        continues.append(1.0 - terminated.float())
    return Trajectory(torch.stack(obs), torch.stack(actions), torch.stack(rewards), torch.stack(continues))


class ActorCritic(nn.Module):
    """Actor, critic, slow critic and return normaliser with their :class:`AgentConfig`.

    Typical update (the caller owns optimiser, backward and step)::

        traj = imagine(world_model, ac.actor, start_state, ac.config.horizon, generator)
        loss, metrics = ac.loss(traj); opt.zero_grad(); loss.backward(); opt.step(); ac.update_slow()

    Args:
        config: :class:`AgentConfig`. ``state_dict()`` holds all four parts (safetensors-friendly tensors).
    """

    def __init__(self, config: AgentConfig) -> None:
        super().__init__()
        if config.obs_dim < 1 or config.num_actions < 1:
            raise ValueError(f"obs_dim/num_actions: expected positive ints, got {config.obs_dim}, "
                             f"{config.num_actions}")
        self.config = config
        self.actor = Actor(config.obs_dim, config.num_actions, config.hidden, config.layers, config.unimix)
        self.critic = Critic(config.obs_dim, config.hidden, config.layers, config.num_bins)
        self.slow_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.normalizer = ReturnNormalizer()

    def act(self, obs: torch.Tensor, generator: torch.Generator | None = None, greedy: bool = False) -> torch.Tensor:
        """``obs`` float32 ``(B, K·d_z)`` → int64 actions ``(B,)`` (sampled, or argmax when ``greedy``)."""
        return self.actor.act(obs, generator, greedy)

    def loss(self, traj: Trajectory, update_normalizer: bool = True) -> tuple[torch.Tensor, Metrics]:
        """:func:`actor_critic_loss` with this agent's networks and hyper-parameters."""
        c = self.config
        return actor_critic_loss(self.actor, self.critic, self.slow_critic, traj, self.normalizer, c.gamma,
                                 c.lam, c.entropy_coef, c.slow_reg, update_normalizer)

    @torch.no_grad()
    def update_slow(self, fraction: float | None = None) -> None:
        """``slow ← (1 − f)·slow + f·critic`` with ``f = config.slow_fraction`` by default (DreamerV3: 0.02)."""
        f = self.config.slow_fraction if fraction is None else fraction
        for slow, fast in zip(self.slow_critic.parameters(), self.critic.parameters()):
            slow.lerp_(fast, f)
