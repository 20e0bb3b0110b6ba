"""Stage 1 (``ditwm collect --agent rssm``): a DreamerV3-style agent learns real Pong while filling the store.

Straight-line loop (nanoGPT style), three phases:

1. ``prefill``: random play for ``prefill`` env steps (a diverse first dataset).
2. ``autoencoder``: the frame autoencoder trains on the prefill frames for ``ae_steps`` updates, then is frozen
   for good — every later stage and the policy read its latents. All stored frames so far are encoded.
3. ``agent``: the actor (input: the last ``K`` latents) plays; every ``train_every`` env steps one update of the
   RSSM (DreamerV3 world-model loss on ``(batch, seq_len)`` replay windows of latents) and one actor-critic
   update in RSSM imagination from every posterior of that batch (horizon 15, λ-returns).

Resume. The real game's state cannot be saved (ale-py's vector env has no clone). A checkpoint is written every
``checkpoint_every`` env steps while the games play on; a resumed run starts fresh games (reset seeded by
``(seed, env_steps)``), so in-progress episodes end at the checkpoint. All other state (models, optimizers,
RNGs, replay, counters) is restored exactly: with ``segment_reset`` the uninterrupted run also restarts its
games at every checkpoint, and a run resumed from any checkpoint is then bit-identical on CPU to an
uninterrupted one (the tests use this; real runs keep episodes whole, since Pong episodes are longer than a
segment). SIGTERM/SIGINT checkpoint at once and exit 143/130.
Store chunks written after the checkpoint being resumed are removed so store and replay agree.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dit_envs.envs.real import action_meanings, make_real_env
from dit_envs.models.autoencoder import AUTOENCODER_PRESETS, FrameAutoencoder
from dit_envs.models.rssm import RSSM
from dit_envs.models.rssm_world_model import RSSMWorldModel
from trainers.agent import ActorCritic, AgentConfig, imagine
from trainers.autoencoder import AutoencoderTrainer
from trainers.checkpoint import load_checkpoint, load_optimizer_state, optimizer_state, save_checkpoint
from trainers.common import JsonlLogger, catch_stop_signals, signal_exit_code
from trainers.data import EpisodeStore
from trainers.replay import Replay

PHASES = ("prefill", "autoencoder", "agent")

#: Model-size presets of :class:`Stage1Config` (``--size``): "default" for real runs, "tiny" for tests.
SIZES: dict[str, dict] = {
    "default": {},
    "tiny": dict(ae_preset="tiny", ae_batch=8, deter=32, hidden=32, stoch=4, classes=4, agent_hidden=32, batch=4,
                 seq_len=8, horizon=5),
}


@dataclass
class Stage1Config:
    """Stage-1 hyper-parameters (saved in checkpoints and exported artifacts)."""

    game: str = "Pong"
    num_envs: int = 16
    seed: int = 0
    prefill: int = 20_000
    ae_preset: str = "base"
    ae_steps: int = 16_000
    ae_batch: int = 16
    context_len: int = 4
    deter: int = 256
    hidden: int = 256
    stoch: int = 16
    classes: int = 16
    agent_hidden: int = 256
    batch: int = 16
    seq_len: int = 32
    horizon: int = 15
    train_every: int = 32
    wm_lr: float = 3e-4
    ac_lr: float = 1e-4
    checkpoint_every: int = 10_000
    segment_reset: bool = False
    device: str = "cpu"


class Stage1:
    """All state of a stage-1 run (models, optimizers, RNGs, replay, counters) and its loop."""

    def __init__(self, cfg: Stage1Config, out: Path, chunk_rows: int = 4096) -> None:
        self.cfg, self.out, self.dev = cfg, out, torch.device(cfg.device)
        self.store = EpisodeStore(out, chunk_rows=chunk_rows)
        torch.manual_seed(cfg.seed)  # parameter init
        self.ae = FrameAutoencoder(AUTOENCODER_PRESETS[cfg.ae_preset]).to(self.dev)
        self.ae_trainer = AutoencoderTrainer(self.ae, total_steps=cfg.ae_steps, warmup=min(100, cfg.ae_steps // 10))
        n_act = len(action_meanings(cfg.game))
        self.num_actions = n_act
        d_z = self.ae.latent_dim
        self.rssm = RSSM(d_z, n_act, deter=cfg.deter, stoch=cfg.stoch, classes=cfg.classes, hidden=cfg.hidden).to(self.dev)
        self.wm = RSSMWorldModel(self.rssm, self.ae, cfg.context_len)
        self.ac = ActorCritic(AgentConfig(obs_dim=cfg.context_len * d_z, num_actions=n_act,
                                          hidden=cfg.agent_hidden, horizon=cfg.horizon)).to(self.dev)
        self.wm_opt = torch.optim.Adam(self.rssm.parameters(), lr=cfg.wm_lr, eps=1e-8)
        self.ac_opt = torch.optim.Adam([*self.ac.actor.parameters(), *self.ac.critic.parameters()],
                                       lr=cfg.ac_lr, eps=1e-5)
        self.gen = torch.Generator(device=self.dev).manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.replay = Replay(d_z)
        self.phase, self.env_steps, self.updates, self.next_ep = "prefill", 0, 0, 0
        self.env = make_real_env(cfg.game, num_envs=cfg.num_envs)
        self.stop: int | None = None

    # ---- segments and acting ---------------------------------------------------------------------------------
    def start_segment(self) -> None:
        """Reset all games with a seed derived from ``(seed, env_steps)`` and record their first frames."""
        n = self.cfg.num_envs
        obs, _ = self.env.reset(seed=self.cfg.seed * 1_000_003 + self.env_steps)
        self.episode = np.arange(self.next_ep, self.next_ep + n, dtype=np.int64)
        self.next_ep += n
        self.step_idx = np.zeros(n, np.int64)
        self.obs = obs
        rows = self._add_rows(obs, np.full(n, -1), np.zeros(n, np.float32), np.zeros(n, bool), np.zeros(n, bool),
                              self.episode, self.step_idx)
        self.hist_rows = np.repeat(rows[:, None], self.cfg.context_len, axis=1)  # (N, K) replay rows

    def _add_rows(self, obs, action, reward, term, trunc, episode, step) -> np.ndarray:
        self.store.add(obs=obs, action=action, reward=reward, terminated=term, truncated=trunc, episode=episode,
                       step=step)
        z = self.encode(obs) if self.phase == "agent" else None
        return self.replay.add(z, action, reward, term, episode, step)

    @torch.no_grad()
    def encode(self, obs: np.ndarray) -> np.ndarray:
        return self.ae.encode(torch.as_tensor(obs, device=self.dev)).cpu().numpy()

    @torch.no_grad()
    def act(self) -> np.ndarray:
        if self.phase != "agent":
            return self.rng.integers(0, self.num_actions, self.cfg.num_envs)
        stack = torch.as_tensor(self.replay.z[self.hist_rows], device=self.dev).flatten(1)  # (N, K·d_z)
        return self.ac.act(stack, self.gen).cpu().numpy()

    def env_step(self, segment_end: int) -> None:
        """One batched real step: act, store the transition rows (and next episodes' first frames)."""
        n = self.cfg.num_envs
        action = self.act()
        nxt, reward, term, trunc, info = self.env.step(action)
        done = term | trunc
        last = self.env_steps + n >= segment_end
        frame = nxt.copy()
        for i in np.flatnonzero(done):
            frame[i] = info["final_obs"][i]
        self.step_idx += 1
        rows = self._add_rows(frame, action, reward, term, trunc | (last & ~done), self.episode, self.step_idx)
        self.hist_rows = np.concatenate([self.hist_rows[:, 1:], rows[:, None]], axis=1)
        if done.any():
            k = int(done.sum())
            self.episode[done] = np.arange(self.next_ep, self.next_ep + k)
            self.next_ep += k
            self.step_idx[done] = 0
            first = self._add_rows(nxt[done], np.full(k, -1), np.zeros(k, np.float32), np.zeros(k, bool),
                                   np.zeros(k, bool), self.episode[done], self.step_idx[done])
            self.hist_rows[done] = first[:, None]
        self.env_steps += n

    # ---- training ---------------------------------------------------------------------------------------------
    def train_autoencoder(self, log: JsonlLogger) -> None:
        """Phase 2: train the autoencoder on all stored frames so far, then encode the replay."""
        self.store.flush()
        data = self.store.load()
        frames = data["obs"]
        while self.ae_trainer.step < self.cfg.ae_steps and self.stop is None:
            idx = self.rng.integers(0, len(frames), self.cfg.ae_batch)
            m = self.ae_trainer.train_step(torch.as_tensor(frames[idx], device=self.dev))
            if self.ae_trainer.step % 100 == 0:
                log.log(self.env_steps, ae_step=self.ae_trainer.step, **m)
        if self.stop is not None:
            return
        self.ae.requires_grad_(False).eval()
        order = self.replay.lookup(data["episode"], data["step"])  # store row of each replay row
        z = np.concatenate([self.encode(frames[order[i:i + 512]]) for i in range(0, len(order), 512)])
        self.replay.set_latents(z)
        self.phase = "agent"

    def train_update(self) -> dict[str, float]:
        """One RSSM update and one actor-critic update in RSSM imagination."""
        c = self.cfg
        idx = self.replay.sample(self.rng, c.batch, c.seq_len)  # (B, T)
        b = self.replay.batch(idx, self.num_actions, self.dev)
        loss, m_wm, posts = self.rssm.loss_with_posts(b, generator=self.gen)
        self.wm_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.rssm.parameters(), 1000.0)
        self.wm_opt.step()
        start = self.wm.start_states({k: v.detach() for k, v in posts.items()}, b["z"], b["is_first"])
        traj = imagine(self.wm, self.ac.actor, start, c.horizon, self.gen)
        ac_loss, m_ac = self.ac.loss(traj)
        self.ac_opt.zero_grad(set_to_none=True)
        ac_loss.backward()
        torch.nn.utils.clip_grad_norm_([*self.ac.actor.parameters(), *self.ac.critic.parameters()], 100.0)
        self.ac_opt.step()
        self.ac.update_slow()
        self.updates += 1
        return {k: float(v) for k, v in {**m_wm, **m_ac}.items()}

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def save(self) -> None:
        self.store.flush()
        tensors = {f"ae.{k}": v for k, v in self.ae.state_dict().items()}
        tensors.update({f"rssm.{k}": v for k, v in self.rssm.state_dict().items()})
        tensors.update({f"ac.{k}": v for k, v in self.ac.state_dict().items()})
        meta: dict = {"config": asdict(self.cfg), "phase": self.phase, "env_steps": self.env_steps,
                      "updates": self.updates, "next_ep": self.next_ep, "rng": self.rng.bit_generator.state,
                      "chunks": len(self.store.chunk_paths())}
        for name, opt in (("wm_opt", self.wm_opt), ("ac_opt", self.ac_opt)):
            t, m = optimizer_state(opt, name)
            tensors.update(t)
            meta[name] = m
        t, meta["ae_trainer"] = self.ae_trainer.state_dict()
        tensors.update({f"ae_trainer.{k}": v for k, v in t.items()})
        tensors["gen"] = self.gen.get_state()
        tensors.update(self.replay.tensors())
        save_checkpoint(self.out, tensors, meta)

    def load(self) -> None:
        tensors, meta = load_checkpoint(self.out, self.dev)
        self.phase, self.env_steps, self.updates, self.next_ep = (meta["phase"], meta["env_steps"],
                                                                  meta["updates"], meta["next_ep"])
        self.rng.bit_generator.state = meta["rng"]

        def sub(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.ae.load_state_dict(sub("ae."))
        self.rssm.load_state_dict(sub("rssm."))
        self.ac.load_state_dict(sub("ac."))
        load_optimizer_state(self.wm_opt, "wm_opt", tensors, meta["wm_opt"])
        load_optimizer_state(self.ac_opt, "ac_opt", tensors, meta["ac_opt"])
        self.ae_trainer.load_state_dict(sub("ae_trainer."), meta["ae_trainer"])
        if self.phase == "agent":
            self.ae.requires_grad_(False).eval()
        self.gen.set_state(tensors["gen"].cpu())
        self.replay.load_tensors(tensors)
        for path in self.store.chunk_paths()[meta["chunks"]:]:  # written after this checkpoint
            path.unlink()

    # ---- the loop ---------------------------------------------------------------------------------------------
    def run(self, total_steps: int, log: JsonlLogger) -> int:
        c = self.cfg
        restore = catch_stop_signals(lambda signum: setattr(self, "stop", signum))
        bar = tqdm(total=total_steps, initial=self.env_steps, unit="step", desc=f"stage1 {c.game}",
                   disable=not sys.stderr.isatty())
        t0, s0 = time.perf_counter(), self.env_steps
        try:
            self.start_segment()
            while self.env_steps < total_steps and self.stop is None:
                seg_end = min(total_steps, (self.env_steps // c.checkpoint_every + 1) * c.checkpoint_every)
                while self.env_steps < seg_end and self.stop is None:
                    if self.phase == "prefill" and self.env_steps >= c.prefill:
                        self.phase = "autoencoder"
                    if self.phase == "autoencoder":
                        self.train_autoencoder(log)
                        continue
                    self.env_step(seg_end if c.segment_reset else total_steps)
                    bar.update(c.num_envs)
                    while self.phase == "agent" and self.updates < (self.env_steps - c.prefill) // c.train_every:
                        m = self.train_update()
                        if self.updates % 25 == 0:
                            log.log(self.env_steps, updates=self.updates, **m)
                self.save()
                log.log(self.env_steps, checkpoint=1, env_steps_per_s=(self.env_steps - s0) / (time.perf_counter() - t0))
                if c.segment_reset and self.env_steps < total_steps and self.stop is None:
                    self.start_segment()
        finally:
            bar.close()
            restore()
        if self.stop is not None:
            return signal_exit_code(self.stop)
        return 0
