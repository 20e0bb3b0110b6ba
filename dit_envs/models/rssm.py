"""DreamerV3 recurrent state-space model (RSSM) over frozen-autoencoder latents (stage 1 world model).

Source: Hafner et al. 2023, "Mastering Diverse Domains through World Models" (DreamerV3), §2 "World model
learning" and appendix B. The RSSM's observation is the frozen frame autoencoder's latent ``z`` (a ``d_z``
vector), not pixels, so the "encoder" is an MLP over ``z`` and the "decoder" predicts ``z`` (MSE).

Vocabulary (as in DreamerV1–V3): a *state* is a dict with ``deter`` (GRU state ``h``, float32 ``(B, deter)``),
``stoch`` (one-hot sample ``z``, float32 ``(B, stoch, classes)``) and ``logits`` (log-probabilities of the
categoricals that produced ``stoch``, ``(B, stoch, classes)``). ``prior`` = prediction from the past alone
(``img_step``), ``post`` = the same after seeing the current embedding (``obs_step``).

Sequence convention (same as :mod:`dit_envs.models.world_model` contexts): at index ``t`` of a sequence,
``action[t]`` is the action that **preceded** ``z[t]`` (``num_actions`` = null, e.g. at an episode start),
``reward[t]`` the reward of that transition (into ``z[t]``), ``terminated[t]`` whether ``z[t]`` is terminal
and ``is_first[t]`` whether ``z[t]`` starts an episode. The RSSMWorldModel adapter is in ``rssm_world_model.py``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .distributions import TwoHotSymlog
from .dreamer_layers import (MLP, LayerNormGRUCell, categorical_entropy, categorical_kl, mode_onehot,
                             sample_onehot, unimix_logits)

State = dict[str, torch.Tensor]

# DreamerV3 appendix B model sizes (GRU units, MLP width, MLP layers); 32×32 categoricals in all of them.
RSSM_SIZES: dict[str, dict[str, int]] = {
    "XS": dict(deter=256, hidden=256, layers=1),
    "S": dict(deter=512, hidden=512, layers=2),
    "M": dict(deter=1024, hidden=640, layers=3),
}


@dataclasses.dataclass
class RSSMConfig:
    """Constructor arguments of :class:`RSSM`, saved as plain JSON in checkpoints (``dataclasses.asdict``)."""

    latent_dim: int
    num_actions: int
    deter: int = 512
    stoch: int = 32
    classes: int = 32
    hidden: int = 512
    layers: int = 2
    unimix: float = 0.01
    num_bins: int = 255


def _check(name: str, t: torch.Tensor, shape: tuple[int | None, ...], dtype: torch.dtype | None = None) -> None:
    """Raise ValueError naming ``name`` unless ``t`` has ``shape`` (``None`` = any size) and ``dtype``."""
    if t.dim() != len(shape) or any(s is not None and s != a for s, a in zip(shape, t.shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {dtype}, got {t.dtype}")


def _field(batch: Any, name: str) -> torch.Tensor:
    """``batch[name]`` for a mapping, ``batch.name`` for a dataclass; KeyError naming the field otherwise."""
    if isinstance(batch, Mapping):
        if name not in batch:
            raise KeyError(f"batch: expected a field {name!r}, got fields {sorted(batch)}")
        return batch[name]
    if not hasattr(batch, name):
        raise KeyError(f"batch: expected a field {name!r} on {type(batch).__name__}")
    return getattr(batch, name)


class RSSM(nn.Module):
    """DreamerV3 RSSM with encoder, latent decoder, two-hot symlog reward head and continue head.

    Args:
        latent_dim: ``d_z``, size of the frozen-autoencoder latent (the observation).
        num_actions: size of the discrete action set; index ``num_actions`` is the null action (zero vector).
        deter: GRU units ``h`` (DreamerV3 size S: 512).
        stoch: number of categorical variables in ``z`` (DreamerV3: 32).
        classes: classes per categorical (DreamerV3: 32).
        hidden: width of every MLP, and size ``E`` of the embedding (DreamerV3 S: 512).
        layers: hidden layers of the encoder and the three heads (DreamerV3 S: 2).
        unimix: uniform mixture of every categorical (DreamerV3: 0.01).
        num_bins: two-hot bins of the reward head (DreamerV3: 255 over symlog −20..20).
    Raises:
        ValueError: a non-positive size, or ``unimix`` outside ``[0, 1)``.
    """

    def __init__(self, latent_dim: int, num_actions: int, deter: int = 512, stoch: int = 32, classes: int = 32,
                 hidden: int = 512, layers: int = 2, unimix: float = 0.01, num_bins: int = 255) -> None:
        super().__init__()
        for name, v in dict(latent_dim=latent_dim, num_actions=num_actions, deter=deter, stoch=stoch,
                            classes=classes, hidden=hidden, layers=layers, num_bins=num_bins).items():
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if not 0.0 <= unimix < 1.0:
            raise ValueError(f"unimix: expected a value in [0, 1), got {unimix}")
        self.config = RSSMConfig(latent_dim, num_actions, deter, stoch, classes, hidden, layers, unimix, num_bins)
        self.latent_dim, self.num_actions = latent_dim, num_actions
        self.deter, self.stoch, self.classes, self.unimix = deter, stoch, classes, unimix
        self.embed_dim = hidden
        self.feat_dim = deter + stoch * classes
        self.encoder = MLP(latent_dim, None, hidden, layers)
        self.img_in = MLP(stoch * classes + num_actions, None, hidden, 1)
        self.gru = LayerNormGRUCell(hidden, deter)
        self.prior_net = MLP(deter, stoch * classes, hidden, 1)
        self.post_net = MLP(deter + hidden, stoch * classes, hidden, 1)
        self.h0 = nn.Parameter(torch.zeros(deter))  # learned initial state (DreamerV3: deter = tanh(W))
        self.decoder = MLP(self.feat_dim, latent_dim, hidden, layers)
        self.reward_head = MLP(self.feat_dim, num_bins, hidden, layers, zero_init_out=True)
        self.cont_head = MLP(self.feat_dim, 1, hidden, layers)
        self.twohot = TwoHotSymlog(num_bins)

    @classmethod
    def from_config(cls, config: RSSMConfig) -> "RSSM":
        """Build an RSSM from a saved :class:`RSSMConfig`."""
        return cls(**dataclasses.asdict(config))

    # ------------------------------------------------------------------ core recurrence
    def initial(self, batch: int, device: torch.device | str) -> State:
        """Learned initial state for ``batch`` sequences: ``deter = tanh(h0)``, ``stoch`` = mode of its prior.

        Returns fresh (non-aliased) tensors: ``deter (batch, deter)``, ``stoch``/``logits (batch, stoch, classes)``.
        """
        deter = torch.tanh(self.h0).to(device).unsqueeze(0).repeat(batch, 1)  # (B, deter)
        logits = self._prior_logits(deter)  # (B, S, C)
        return {"deter": deter, "stoch": mode_onehot(logits), "logits": logits}

    def _prior_logits(self, deter: torch.Tensor) -> torch.Tensor:
        return unimix_logits(self.prior_net(deter).unflatten(-1, (self.stoch, self.classes)), self.unimix)

    def _action_onehot(self, action: torch.Tensor) -> torch.Tensor:
        """int64 ``(B,)`` in ``[0, num_actions]`` → float32 ``(B, num_actions)``; the null index gives zeros."""
        return F.one_hot(action.clamp(0, self.num_actions), self.num_actions + 1)[..., :-1].float()

    def _check_actions(self, name: str, action: torch.Tensor, allow_null: bool = True) -> None:
        if action.dtype != torch.int64:
            raise ValueError(f"{name}: expected dtype torch.int64, got {action.dtype}")
        high = self.num_actions if allow_null else self.num_actions - 1
        bad = (action < 0) | (action > high)
        if bool(bad.any()):
            raise ValueError(f"{name}: expected values in [0, {high}], got {action[bad][0].item()}")

    @staticmethod
    def _draw(logits: torch.Tensor, generator: torch.Generator | None, sample: bool) -> torch.Tensor:
        return sample_onehot(logits, generator) if sample else mode_onehot(logits)

    def _img_step(self, prev: State, action: torch.Tensor, generator: torch.Generator | None,
                  sample: bool = True) -> State:
        x = torch.cat([prev["stoch"].flatten(-2), self._action_onehot(action)], -1)  # (B, S*C + A)
        deter = self.gru(self.img_in(x), prev["deter"])  # (B, deter)
        logits = self._prior_logits(deter)  # (B, S, C)
        return {"deter": deter, "stoch": self._draw(logits, generator, sample), "logits": logits}

    def img_step(self, prev_state: State, prev_action: torch.Tensor,
                 generator: torch.Generator | None = None) -> State:
        """Prior transition ``p(z_t | h_t)``, ``h_t = GRU(h_{t−1}, z_{t−1}, a_{t−1})`` (DreamerV3 eq. 1).

        Args:
            prev_state: state dict with ``deter (B, deter)`` and ``stoch (B, stoch, classes)``.
            prev_action: int64 ``(B,)`` in ``[0, num_actions]`` (``num_actions`` = null → zero vector).
            generator: drives the categorical sample (seeded → reproducible).
        Returns:
            prior state dict (``deter``, straight-through one-hot ``stoch``, unimix ``logits``).
        Raises:
            ValueError: wrong shape/dtype of ``prev_state`` or ``prev_action``, or an action out of range.
        """
        _check("prev_action", prev_action, (None,))
        b = prev_action.shape[0]
        _check("prev_state['deter']", prev_state["deter"], (b, self.deter))
        _check("prev_state['stoch']", prev_state["stoch"], (b, self.stoch, self.classes))
        self._check_actions("prev_action", prev_action)
        return self._img_step(prev_state, prev_action, generator)

    def _obs_step(self, prev: State, action: torch.Tensor, embed: torch.Tensor, is_first: torch.Tensor,
                  generator: torch.Generator | None, sample: bool = True) -> tuple[State, State]:
        # Episode starts: replace the carried state by the learned initial state and the action by the null one.
        keep = (~is_first).float()[:, None]  # (B, 1)
        init = self.initial(embed.shape[0], embed.device)
        prev = {"deter": keep * prev["deter"] + (1 - keep) * init["deter"],
                "stoch": keep[..., None] * prev["stoch"] + (1 - keep[..., None]) * init["stoch"]}
        action = torch.where(is_first, torch.full_like(action, self.num_actions), action)
        prior = self._img_step(prev, action, generator, sample)
        x = torch.cat([prior["deter"], embed], -1)  # (B, deter + E)
        logits = unimix_logits(self.post_net(x).unflatten(-1, (self.stoch, self.classes)), self.unimix)
        post = {"deter": prior["deter"], "stoch": self._draw(logits, generator, sample), "logits": logits}
        return post, prior

    def obs_step(self, prev_state: State, prev_action: torch.Tensor, embed: torch.Tensor, is_first: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[State, State]:
        """One filtering step: prior from the past, posterior ``q(z_t | h_t, embed_t)`` (DreamerV3 eq. 1).

        Args:
            prev_state: state dict ``(B, ...)`` (ignored where ``is_first``: the learned initial state is used).
            prev_action: int64 ``(B,)`` in ``[0, num_actions]``, the action that preceded this observation.
            embed: float ``(B, E)`` from ``self.encoder(z)``.
            is_first: bool ``(B,)``, the observation starts an episode.
        Returns:
            ``(post, prior)`` state dicts; they share ``deter``.
        Raises:
            ValueError: a wrong shape/dtype, or an action out of range.
        """
        _check("embed", embed, (None, self.embed_dim))
        b = embed.shape[0]
        _check("is_first", is_first, (b,), torch.bool)
        _check("prev_action", prev_action, (b,))
        _check("prev_state['deter']", prev_state["deter"], (b, self.deter))
        _check("prev_state['stoch']", prev_state["stoch"], (b, self.stoch, self.classes))
        self._check_actions("prev_action", prev_action)
        return self._obs_step(prev_state, prev_action, embed, is_first, generator)

    def observe(self, embeds: torch.Tensor, actions: torch.Tensor, is_first: torch.Tensor,
                state: State | None = None, generator: torch.Generator | None = None, sample: bool = True
                ) -> tuple[State, State]:
        """Filter a batch of sequences with :meth:`obs_step`.

        Args:
            embeds: float ``(B, T, E)``; actions: int64 ``(B, T)`` (preceding actions, null allowed);
            is_first: bool ``(B, T)``; state: start state ``(B, ...)`` (default: :meth:`initial`).
            sample: draw ``stoch`` from ``generator``; ``False`` takes the modes (deterministic filtering).
        Returns:
            ``(posts, priors)``: state dicts with tensors ``(B, T, ...)``.
        Raises:
            ValueError: mismatched shapes or dtypes, or an action out of range.
        """
        _check("embeds", embeds, (None, None, self.embed_dim))
        b, t = embeds.shape[:2]
        _check("actions", actions, (b, t))
        _check("is_first", is_first, (b, t), torch.bool)
        self._check_actions("actions", actions)
        state = self.initial(b, embeds.device) if state is None else state
        posts, priors = [], []
        for i in range(t):
            state, prior = self._obs_step(state, actions[:, i], embeds[:, i], is_first[:, i], generator, sample)
            posts.append(state)
            priors.append(prior)
        stack = lambda seq: {k: torch.stack([s[k] for s in seq], 1) for k in seq[0]}  # noqa: E731
        return stack(posts), stack(priors)

    def imagine(self, start: State, policy_or_actions: Callable[[State], torch.Tensor] | torch.Tensor,
                horizon: int, generator: torch.Generator | None = None) -> tuple[State, torch.Tensor]:
        """Roll the prior forward ``horizon`` steps from ``start``.

        Args:
            start: state dict ``(B, ...)``.
            policy_or_actions: int64 ``(B, horizon)`` actions, or a callable ``state -> int64 (B,)`` called on
                the current state before each step.
            horizon: number of steps ``H`` ≥ 1.
        Returns:
            ``(states, actions)``: ``states[k] (B, H, ...)`` where ``states[:, i]`` is reached by taking
            ``actions[:, i] (B, H)`` from ``states[:, i−1]`` (from ``start`` for ``i = 0``).
        Raises:
            ValueError: ``horizon`` < 1, or actions of the wrong shape/dtype/range.
        """
        if horizon < 1:
            raise ValueError(f"horizon: expected >= 1, got {horizon}")
        b = start["deter"].shape[0]
        if isinstance(policy_or_actions, torch.Tensor):
            _check("policy_or_actions", policy_or_actions, (b, horizon))
            self._check_actions("policy_or_actions", policy_or_actions, allow_null=False)
        state, states, actions = start, [], []
        for i in range(horizon):
            if isinstance(policy_or_actions, torch.Tensor):
                action = policy_or_actions[:, i]
            else:
                action = policy_or_actions(state)
                _check("policy(state)", action, (b,))
                self._check_actions("policy(state)", action, allow_null=False)
            state = self._img_step(state, action, generator)
            states.append(state)
            actions.append(action)
        return {k: torch.stack([s[k] for s in states], 1) for k in states[0]}, torch.stack(actions, 1)

    # ------------------------------------------------------------------ heads and losses
    def feature(self, state: State) -> torch.Tensor:
        """Model state features ``cat(h, flatten(z))``: ``(..., deter + stoch*classes)`` float32."""
        return torch.cat([state["deter"], state["stoch"].flatten(-2)], -1)

    def heads(self, state: State) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Predictions from a state ``(...)``: AE latent mean ``(..., d_z)``, reward two-hot logits
        ``(..., num_bins)`` and continue logit ``(...)`` (``sigmoid`` = probability the state is not terminal)."""
        feat = self.feature(state)
        return self.decoder(feat), self.reward_head(feat), self.cont_head(feat).squeeze(-1)

    def kl_loss(self, post: State, prior: State, free: float = 1.0, dyn_scale: float = 0.5,
                rep_scale: float = 0.1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """KL balancing with free bits (DreamerV3 eq. 5).

        ``L_dyn = max(free, KL(sg(post) ‖ prior))`` trains the prior, ``L_rep = max(free, KL(post ‖ sg(prior)))``
        the representation; loss = mean over ``(...)`` of ``dyn_scale·L_dyn + rep_scale·L_rep``. Below ``free``
        nats a term is constant (zero gradient), so the model is not pushed to collapse an already small KL.

        Args:
            post, prior: state dicts whose ``logits`` are ``(..., stoch, classes)``.
        Returns:
            ``(loss, metrics)``: scalar loss; metrics ``kl_dyn``, ``kl_rep`` (unclipped means, nats),
            ``post_ent``, ``prior_ent`` (nats, summed over variables), all detached scalars.
        """
        dyn = categorical_kl(post["logits"].detach(), prior["logits"])  # (...)
        rep = categorical_kl(post["logits"], prior["logits"].detach())  # (...)
        loss = (dyn_scale * dyn.clamp(min=free) + rep_scale * rep.clamp(min=free)).mean()
        metrics = {"kl_dyn": dyn.detach().mean(), "kl_rep": rep.detach().mean(),
                   "post_ent": categorical_entropy(post["logits"].detach()).sum(-1).mean(),
                   "prior_ent": categorical_entropy(prior["logits"].detach()).sum(-1).mean()}
        return loss, metrics

    def loss_with_posts(self, batch: Any, free: float = 1.0, dyn_scale: float = 0.5, rep_scale: float = 0.1,
                        pred_scale: float = 1.0, generator: torch.Generator | None = None
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor], State]:
        """:meth:`world_model_loss` that also returns the posteriors ``(B, T, ...)`` (imagination start states)."""
        z, action = _field(batch, "z"), _field(batch, "action")
        reward, terminated, is_first = _field(batch, "reward"), _field(batch, "terminated"), _field(batch, "is_first")
        _check("batch.z", z, (None, None, self.latent_dim))
        b, t = z.shape[:2]
        _check("batch.action", action, (b, t), torch.int64)
        _check("batch.reward", reward, (b, t))
        _check("batch.terminated", terminated, (b, t))
        _check("batch.is_first", is_first, (b, t), torch.bool)
        z = z.float()
        posts, priors = self.observe(self.encoder(z), action, is_first, generator=generator)
        z_pred, reward_logits, cont_logit = self.heads(posts)  # (B, T, d_z), (B, T, bins), (B, T)
        # Negative log-likelihoods per step (DreamerV3 sums over the observation's dimensions).
        loss_dec = (z_pred.float() - z).pow(2).sum(-1)  # (B, T)
        loss_rew = self.twohot.loss(reward_logits.float(), reward.float())  # (B, T)
        cont_target = 1.0 - terminated.float()
        loss_cont = F.binary_cross_entropy_with_logits(cont_logit.float(), cont_target, reduction="none")
        kl, kl_metrics = self.kl_loss(posts, priors, free, dyn_scale, rep_scale)
        pred = (loss_dec + loss_rew + loss_cont).mean()
        loss = pred_scale * pred + kl
        with torch.no_grad():
            metrics = {"wm_loss": loss.detach(), "loss_dec": loss_dec.mean(), "loss_rew": loss_rew.mean(),
                       "loss_cont": loss_cont.mean(), "z_mse": (z_pred.float() - z).pow(2).mean(),
                       "reward_mae": (self.twohot.mean(reward_logits.float()) - reward.float()).abs().mean(),
                       "cont_acc": ((cont_logit > 0).float() == cont_target).float().mean(), **kl_metrics}
        return loss, metrics, posts

    def world_model_loss(self, batch: Any, free: float = 1.0, dyn_scale: float = 0.5, rep_scale: float = 0.1,
                         pred_scale: float = 1.0, generator: torch.Generator | None = None
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """DreamerV3 world-model loss ``β_pred·L_pred + β_dyn·L_dyn + β_rep·L_rep`` (eq. 3–5; 1, 0.5, 0.1).

        ``L_pred`` per step = summed squared error of the predicted AE latent + two-hot symlog cross-entropy of
        the reward + Bernoulli NLL of ``continue = 1 − terminated``; all averaged over ``(B, T)``.

        Args:
            batch: mapping or dataclass with ``z`` float ``(B, T, d_z)``, ``action`` int64 ``(B, T)`` (preceding
                action, ``num_actions`` = null), ``reward`` float ``(B, T)``, ``terminated`` bool/float
                ``(B, T)``, ``is_first`` bool ``(B, T)`` — see the module docstring for the index convention.
        Returns:
            ``(loss, metrics)``: scalar loss; detached scalar metrics (``wm_loss``, ``loss_dec``, ``loss_rew``,
            ``loss_cont``, ``z_mse``, ``reward_mae``, ``cont_acc``, ``kl_dyn``, ``kl_rep``, entropies).
        Raises:
            KeyError: a missing batch field. ValueError: a field of the wrong shape/dtype, or bad actions.
        """
        loss, metrics, _ = self.loss_with_posts(batch, free, dyn_scale, rep_scale, pred_scale, generator)
        return loss, metrics
