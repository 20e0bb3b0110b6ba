"""Stage 3 (``ditwm train-agent``): a policy trained purely in world-model imagination, scored on the real game.

The actor-critic of :mod:`trainers.agent` (DreamerV3, Hafner et al. 2023; input = the flattened last ``K``
frozen-encoder latents) trains only on the natively batched imagination env with latent observations
(``gym.make_vec(..., obs_type="latent")``, one batched world-model call per step): each update rolls the actor
for ``--horizon`` steps in ``--num-envs`` envs and takes one DreamerV3 step (:mod:`trainers.rollout`: λ-returns
cut at episode ends, return normalisation, entropy bonus, slow critic). Every ``--eval-every`` updates the greedy
policy plays ``--eval-episodes`` real games through the world model's own frozen encoder
(:func:`trainers.policy.evaluate_policy`, DESIGN.md §4 "Agent score"). Any bundle runs the same loop — an RSSM
bundle (``rssm:STAGE1_DIR``) or a DiT — so the RSSM → DiT swap is measured with everything else equal; and so does
the real game seen through the stage-1 encoder (``real:STAGE1_DIR``, :mod:`trainers.agent_envs`): a perfect world
model, the ceiling of this learner at a given number of updates (in real env steps: not an Atari-100k agent).

Updates. By default one DreamerV3 gradient step per rollout. ``--epochs E --minibatches M`` take ``E·M`` steps on
each rollout instead, with PPO's clipped surrogate (Schulman et al. 2017; :func:`trainers.rollout.clipped_loss`):
where imagined steps are the cost, each is learned from several times.
Step sizes. ``--lr``, ``--gamma``, ``--entropy-coef`` default to DreamerV3's (3e-5, 0.997, 3e-4, for long GPU runs);
on Pong in a CPU budget lr 1e-4, γ 0.99 and η 3e-3 learned where they did not (README, results).
Rejection. ``--keep-ball R`` (Pong) draws a step again where the ball is lost without a point; its options
(returns, reward, truncation, penalty): :func:`trainers.agent_envs.attach_keep_ball`.
Uncertainty. ``--uncertainty-penalty P`` (any game) charges ``P`` on every imagined step whose
``--uncertainty-draws`` draws from the same state and action spread more than their ``--uncertainty-quantile`` over
one step from the start contexts (:mod:`dit_envs.envs.uncertainty`; MOReL-style pessimism);
``--uncertainty-truncate`` ends the imagined episode at such a step (MBPO-style).
``--init policy:DIR`` continues a run's policy in another world model: with ``ditwm collect --agent policy`` and
``ditwm pretrain --init`` this is a DIAMOND-style alternation (Alonso et al. 2024) of data collection, world-model
fine-tuning and training in imagination. ``--episode-steps 15`` with ``--start-data STORE`` imagines as DreamerV3 and
DIAMOND do: every update starts all envs from real contexts (here ``--start-contexts`` windows drawn from the store,
e.g. the current policy's own play, :mod:`trainers.starts`) and truncates after ``--episode-steps`` (= ``--horizon``)
steps, bootstrapping from the critic, instead of free-running 1 000-step imagined episodes whose model errors
compound.

Outputs in ``--out``: ``metrics.jsonl`` (train records every 10 updates, ``eval_*`` records), ``curves.png``
(real-game and imagined returns), ``ckpt/`` (atomic training state for ``--resume``), and at the end
``agent.safetensors`` + ``agent.json`` (stage 1's format); ``best/`` holds the policy of the best evaluation so far
(like SB3's ``EvalCallback``; its ``agent.json`` records the evaluation that chose it, whose figure is biased upward
by the choice: score it again with another seed). ``--steps`` counts actor-critic updates; imagined
env steps = updates × horizon × num_envs.

Resume. The run is cut into segments of ``--eval-every`` updates; each starts the envs from a reset seeded by
``(seed, updates)`` and ends with an evaluation and a checkpoint, so a run resumed from a segment-end checkpoint
equals an uninterrupted one on CPU. SIGTERM / SIGINT checkpoint at once and exit 143 / 130.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from trainers.agent import ActorCritic, AgentConfig
from trainers.agent_envs import (REAL_PREFIX, attach_keep_ball, attach_uncertainty, check_real_args,
                                 check_uncertainty_args, make_training_env, resample_rates, warn_if_other_encoder)
from trainers.agent_io import evaluation_encoder, load_agent, save_agent, stage1_dir
from trainers.checkpoint import load_checkpoint, load_optimizer_state, optimizer_state, save_checkpoint
from trainers.common import (DTYPE_NAMES, ArgError, JsonlLogger, catch_stop_signals, check_choice, check_out_dir,
                             check_sampling_shift, check_temperature, pick_device, run_cli, seed_everything,
                             setting_arg_error, signal_exit_code)
from trainers.data import EpisodeStore
from trainers.evaluate_agent import read_starts
from trainers.policy import evaluate_policy
from trainers.rollout import clipped_loss, collect_rollout, reference_kl, rollout_loss, rollout_targets
from trainers.train_agent_args import RESUME_CHECKED, Args
from trainers.train_agent_report import plot_curves

LOG_EVERY = 10


@dataclass
class Setup:
    """Validated inputs: the env, the initial actor-critic, where it came from, and what the run trains on."""

    envs: object
    ac: ActorCritic
    k: int
    init: str
    game: str
    action_meanings: list[str]
    device: torch.device
    encoder: object = None  # the frozen encoder of the observations (real-game evaluation uses it too)
    start_rows: int | None = None  # readable rows of --start-data when the run began (checked on resume)


def _init_dir(args: Args) -> Path | None:
    """The stage-1 directory to start from, or None for ``scratch``. Raises :class:`ArgError` (``init``)."""
    if args.init == "scratch":
        return None
    if args.init.startswith(("stage1:", "policy:")):
        src = Path(args.init.split(":", 1)[1])
    elif args.init == "auto":
        wm = args.world_model
        prefix = next((p for p in ("rssm:", REAL_PREFIX) if wm.startswith(p)), "")
        src = Path(wm[len(prefix):]) if prefix else Path(wm).parent
        if not prefix and not (src / "agent.json").is_file():
            raise ArgError("init", f"expected stage1:DIR or scratch (no stage-1 agent next to the world model "
                                   f"{wm!r}), got 'auto'")
    else:
        raise ArgError("init", f"expected stage1:DIR, policy:DIR, scratch or auto, got {args.init!r}")
    try:
        return stage1_dir(src)
    except FileNotFoundError as e:
        raise ArgError("init", str(e)) from None


def _set_start_contexts(args: Args, envs, k: int, dev: torch.device) -> int:
    """Replace the env's start contexts by ``--start-contexts`` windows of ``--start-data`` (seeded by ``--seed``,
    so a resumed run on the same store draws the same) → the store's readable rows. Raises :class:`ArgError`
    (``start_data``)."""
    from trainers.starts import draw_start_contexts, store_rows

    model = envs.unwrapped.bundle.model
    try:
        meta = EpisodeStore(args.start_data).read_meta()
        game = envs.unwrapped.bundle.config["game"]
        if meta.get("game") != game:
            raise ValueError(f"game: expected {game!r} (the world model's), the store has {meta.get('game')!r}")
        z, a = draw_start_contexts(args.start_data, model, k=k, m=args.start_contexts,
                                   num_actions=int(model.num_actions), seed=args.seed, device=dev)
        envs.unwrapped.core.set_start_contexts(z, a)
        return store_rows(args.start_data)
    except (FileNotFoundError, ValueError) as e:
        raise ArgError("start_data", f"expected an episode store of the world model's game with episodes of >= {k} "
                                     f"frames, got {args.start_data!r}: {e}") from None


def prepare(args: Args) -> Setup:
    """Validate every argument and build the env and the initial actor-critic; writes nothing.

    Raises:
        ArgError: a bad argument, naming it (exit 2 from the CLI).
    """
    for name in ("steps", "num_envs", "horizon", "eval_episodes", "eval_max_steps", "hidden", "start_contexts",
                 "epochs", "minibatches"):
        if getattr(args, name) < 1:
            raise ArgError(name, f"expected an integer >= 1, got {getattr(args, name)}")
    for name in ("eval_every", "episode_steps", "sampling_steps", "keep_ball"):
        if getattr(args, name) < 0:
            raise ArgError(name, f"expected an integer >= 0, got {getattr(args, name)}")
    if args.eval_seed < -1:
        raise ArgError("eval_seed", f"expected a seed >= 0 or -1 (--seed), got {args.eval_seed}")
    read_starts(args.eval_starts, "eval_starts")
    if args.minibatches > args.num_envs:
        raise ArgError("minibatches", f"expected at most --num-envs ({args.num_envs}), got {args.minibatches}")
    if not 0.0 < args.clip < 1.0:
        raise ArgError("clip", f"expected a ratio clip in (0, 1), got {args.clip}")
    if not args.lr > 0:
        raise ArgError("lr", f"expected a learning rate > 0, got {args.lr}")
    if not 0.0 < args.gamma <= 1.0:
        raise ArgError("gamma", f"expected a discount in (0, 1], got {args.gamma}")
    for name in ("entropy_coef", "kl_coef"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) >= 0):
            raise ArgError(name, f"expected a number >= 0, got {getattr(args, name)}")
    if args.kl_coef and args.init == "scratch":
        raise ArgError("kl_coef", f"expected 0 with --init scratch (no policy to stay near), got {args.kl_coef}")
    if args.start_data:
        args.start_data = str(Path(args.start_data).expanduser().resolve())  # compared on resume
    elif args.start_contexts != Args.start_contexts:
        raise ArgError("start_contexts", f"expected --start-data with it, got --start-contexts "
                                         f"{args.start_contexts} alone")
    check_temperature(args.temperature)
    check_sampling_shift(args.sampling_shift)
    check_uncertainty_args(args.uncertainty_penalty, args.uncertainty_draws, args.uncertainty_quantile,
                           args.uncertainty_truncate)
    check_choice("dtype", args.dtype, DTYPE_NAMES)
    dev = pick_device(args.device)
    out = check_out_dir(args.out, args.resume)
    prev_rows = None
    init_dir = _init_dir(args)
    if args.resume and (out / "ckpt").exists():
        try:
            _, meta = load_checkpoint(out)
        except FileNotFoundError as e:
            raise ArgError("out", f"expected a readable checkpoint to resume, got {e}") from None
        defaults = {f.name: f.default for f in dataclasses.fields(Args)}  # for keys absent in older runs
        for name in RESUME_CHECKED:
            prev = meta["args"].get(name, defaults[name])
            if prev != getattr(args, name):
                raise ArgError(name, f"expected {prev!r} (the run being resumed), got {getattr(args, name)!r}")
        prev_rows = meta.get("start_rows")
    real = args.world_model.startswith(REAL_PREFIX)
    if real:
        check_real_args(args)
    sampler = {} if real else dict(max_episode_steps=args.episode_steps or None, dtype=args.dtype,
                                   sampling_steps=args.sampling_steps or None, temperature=args.temperature,
                                   sampling_shift=args.sampling_shift)
    try:
        te = make_training_env(args.world_model, args.num_envs, device=dev, **sampler)
    except ValueError as e:
        raise setting_arg_error(e, "world_model", f"expected a loadable world model, got {args.world_model!r}: "
                                                  f"{e.args[0] if e.args else e}") from None
    except (FileNotFoundError, KeyError, OSError, ImportError) as e:
        raise ArgError("world_model", f"expected a loadable world model, got {args.world_model!r}: "
                                      f"{e.args[0] if e.args else e}") from None
    envs = te.envs
    attach_keep_ball(envs, args.keep_ball, args.lost_ball_reward, args.keep_ball_returns, args.lost_ball_truncate,
                     args.rejection_penalty)
    k_env, d_z = envs.single_observation_space.shape
    start_rows = _set_start_contexts(args, envs, k_env, dev) if args.start_data else None
    if prev_rows is not None and start_rows != prev_rows:
        raise ArgError("start_data", f"expected the store of the run being resumed ({prev_rows} readable rows), got "
                                     f"{start_rows} rows in {args.start_data!r}: its start contexts would differ")
    threshold = attach_uncertainty(envs, args.uncertainty_penalty, args.uncertainty_draws, args.uncertainty_quantile,
                                   args.uncertainty_truncate)
    if threshold is not None:
        what = " and ".join([f"penalty {args.uncertainty_penalty}"] * bool(args.uncertainty_penalty)
                            + ["truncation"] * args.uncertainty_truncate)
        print(f"train-agent: uncertainty {what} on steps whose spread of "
              f"{args.uncertainty_draws} draws passes {threshold:.3e} (its {args.uncertainty_quantile} quantile from "
              f"the start contexts)")
    n_act = int(envs.single_action_space.n)
    if init_dir is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            ac = ActorCritic(AgentConfig(obs_dim=k_env * d_z, num_actions=n_act, hidden=args.hidden,
                                         horizon=args.horizon, lr=args.lr, gamma=args.gamma,
                                         entropy_coef=args.entropy_coef))
        k, init = k_env, "scratch"
    else:
        try:
            ac, meta = load_agent(init_dir)
        except (FileNotFoundError, ValueError) as e:
            raise ArgError("init", str(e)) from None
        k, cfg = int(meta["context_len"]), ac.config
        if cfg.num_actions != n_act or k * d_z != cfg.obs_dim or k > k_env:
            raise ArgError("init", f"expected an agent for {n_act} actions and K<={k_env} latents of "
                                   f"d_z={d_z}, got num_actions={cfg.num_actions}, obs_dim={cfg.obs_dim}, K={k}")
        if meta.get("game", te.game) != te.game:
            raise ArgError("init", f"expected an agent of {te.game!r} (the world model's game), got one of "
                                   f"{meta['game']!r}")
        warn_if_other_encoder(init_dir, meta, te.encoder)
        ac.config = dataclasses.replace(cfg, horizon=args.horizon, lr=args.lr, gamma=args.gamma,
                                        entropy_coef=args.entropy_coef)
        init = f"{'policy' if args.init.startswith('policy:') else 'stage1'}:{init_dir}"
    return Setup(envs, ac.to(dev).train(), k, init, te.game, te.action_meanings, dev, te.encoder, start_rows)


class AgentTrainer:
    """State of a stage-3 run: env, actor-critic, optimiser, RNGs, counters, curves; and its loop."""

    def __init__(self, args: Args, setup: Setup) -> None:
        self.args, self.s, self.out = args, setup, Path(args.out)
        self.eval_starts = read_starts(args.eval_starts, "eval_starts")  # None: random real games
        self.ac, self.envs, self.dev = setup.ac, setup.envs, setup.device
        params = [*self.ac.actor.parameters(), *self.ac.critic.parameters()]
        self.params = params
        self.opt = torch.optim.Adam(params, lr=args.lr, eps=1e-5)  # DreamerV3: eps 1e-5, grad clip 100
        # --kl-coef: the initial policy, frozen (prepare() loads it again on resume, before the checkpoint)
        self.reference = (copy.deepcopy(self.ac.actor).requires_grad_(False).eval() if args.kl_coef else None)
        self.gen = torch.Generator(device=self.dev).manual_seed(args.seed)
        self.encoder = evaluation_encoder(args.world_model, setup.encoder, self.dev)
        self.updates, self.env_steps = 0, 0
        self.history: list[dict] = []  # one record per evaluation (also in the checkpoint, for the curves)
        self.imagined: list[float] = []  # imagined episode returns since the last evaluation
        self.stop: int | None = None
        self.train_time = 0.0  # seconds spent in updates (rollout + loss + step), without evaluations

    # ---- evaluation, checkpoints, export --------------------------------------------------------------------
    def evaluate(self, log: JsonlLogger) -> None:
        a = self.args
        self.ac.eval()
        res = evaluate_policy(self.encoder, self.ac.actor, self.s.k, self.s.game, a.eval_episodes,
                              a.seed if a.eval_seed < 0 else a.eval_seed,
                              greedy=True, device=self.dev, max_steps=a.eval_max_steps,
                              starts=self.eval_starts)
        self.ac.train()
        rec = {"updates": self.updates, "env_steps": self.env_steps, "eval_return_mean": res["mean"],
               "eval_return_std": res["std"], "eval_length_mean": float(np.mean(res["lengths"])),
               "imagined_episodes": len(self.imagined), **resample_rates(self.envs)}
        if "starts" in res:  # --eval-starts: which starts (phases of the game) the policy wins
            rec["eval_returns"] = res["returns"]
        if self.imagined:  # no record (rather than NaN, which is not JSON) when no imagined episode ended
            rec["imagined_return_mean"] = float(np.mean(self.imagined))
        self.imagined = []
        best = max((r["eval_return_mean"] for r in self.history), default=-math.inf)
        self.history.append(rec)
        log.log(self.updates, **rec)
        if rec["eval_return_mean"] > best:  # EvalCallback-style best snapshot (chosen on these episodes)
            save_agent(self.ac, self.out / "best", context_len=self.s.k, game=self.s.game,
                       action_meanings=self.s.action_meanings, world_model=a.world_model, init=self.s.init,
                       updates=self.updates, env_steps=self.env_steps, selected_by=rec)
        plot_curves(self.history, self.out / "curves.png", title=f"train-agent on {a.world_model}")

    def save(self) -> None:
        tensors = {f"ac.{k}": v for k, v in self.ac.state_dict().items()}
        t, opt_meta = optimizer_state(self.opt, "opt")
        tensors.update(t)
        tensors["gen"] = self.gen.get_state()
        tensors["torch_rng"] = torch.get_rng_state()
        np_state = np.random.get_state()
        meta = {"args": dataclasses.asdict(self.args), "init": self.s.init, "agent": dataclasses.asdict(self.ac.config),
                "start_rows": self.s.start_rows,
                "updates": self.updates, "env_steps": self.env_steps, "history": self.history, "opt": opt_meta,
                "python_rng": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
                "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
        save_checkpoint(self.out, tensors, meta)

    def load(self) -> None:
        tensors, meta = load_checkpoint(self.out, self.dev)
        self.ac.config = AgentConfig(**meta["agent"])
        self.ac.load_state_dict({k[3:]: v for k, v in tensors.items() if k.startswith("ac.")})
        load_optimizer_state(self.opt, "opt", tensors, meta["opt"])
        for group in self.opt.param_groups:
            group["lr"] = self.args.lr
        self.gen.set_state(tensors["gen"].cpu())
        torch.set_rng_state(tensors["torch_rng"].cpu())
        py = meta["python_rng"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        npr = meta["numpy_rng"]
        np.random.set_state((npr[0], np.array(npr[1], dtype=np.uint32), *npr[2:]))
        self.updates, self.env_steps, self.history = meta["updates"], meta["env_steps"], meta["history"]
        self.s.init = meta["init"]

    def export(self) -> Path:
        return save_agent(self.ac, self.out, context_len=self.s.k, game=self.s.game,
                          action_meanings=self.s.action_meanings, world_model=self.args.world_model,
                          init=self.s.init, updates=self.updates, env_steps=self.env_steps)

    # ---- one update and the loop ----------------------------------------------------------------------------
    def act(self, x: torch.Tensor) -> torch.Tensor:
        return self.ac.act(x, self.gen)

    def step(self, loss: torch.Tensor) -> torch.Tensor:
        """One Adam step on ``loss`` (gradient norm clipped at 100, DreamerV3) → the norm before clipping."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, 100.0)
        self.opt.step()
        return grad_norm

    def regularised(self, loss: torch.Tensor, m: dict, obs: torch.Tensor) -> torch.Tensor:
        """``loss + β·KL(π_init ‖ π)`` on ``obs`` (``--kl-coef β``; logged as ``kl_init``), or ``loss`` unchanged."""
        if self.reference is None:
            return loss
        kl = reference_kl(self.ac.actor, self.reference, obs)
        m["kl_init"] = kl.detach()
        return loss + self.args.kl_coef * kl

    def update(self, obs, running: np.ndarray):
        a, t0 = self.args, time.perf_counter()
        rollout, obs = collect_rollout(self.envs, self.act, obs, a.horizon, self.s.k, running, self.dev)
        if a.epochs == a.minibatches == 1:
            loss, m = rollout_loss(self.ac, rollout)
            grad_norm = self.step(self.regularised(loss, m, rollout.traj.obs[:-1]))
        else:  # several clipped steps on one rollout (PPO)
            targets = rollout_targets(self.ac, rollout)
            for _ in range(a.epochs):
                perm = torch.randperm(a.num_envs, generator=self.gen, device=self.dev)
                for envs in torch.tensor_split(perm, a.minibatches):  # M near-equal shares
                    loss, m = clipped_loss(self.ac, rollout, targets, envs, a.clip)
                    grad_norm = self.step(self.regularised(loss, m, rollout.traj.obs[:-1, envs]))
            m.update(return_mean=targets.returns.mean(), return_scale=self.ac.normalizer.scale())
        self.ac.update_slow()
        self.updates += 1
        self.env_steps += a.horizon * a.num_envs
        self.imagined.extend(rollout.episode_returns)
        self.train_time += time.perf_counter() - t0
        m = {k: float(v) for k, v in m.items()}
        m.update(grad_norm=float(grad_norm), imagined_reward_mean=float(rollout.traj.rewards.mean()),
                 imagined_term_rate=float(1.0 - rollout.traj.continues.mean()))
        return obs, m

    def run(self, log: JsonlLogger) -> int:
        a = self.args
        seg = a.eval_every or a.steps
        restore = catch_stop_signals(lambda signum: setattr(self, "stop", signum))
        bar = tqdm(total=a.steps, initial=self.updates, unit="update", desc="train-agent",
                   disable=not sys.stderr.isatty())
        u0 = self.updates
        try:
            if self.updates == 0 and a.eval_every and not self.history:
                self.evaluate(log)  # the starting point of the curves
            while self.updates < a.steps and self.stop is None:
                seg_end = min(a.steps, (self.updates // seg + 1) * seg)
                obs, _ = self.envs.reset(seed=a.seed * 1_000_003 + self.updates)
                running = np.zeros(a.num_envs)
                while self.updates < seg_end and self.stop is None:
                    obs, m = self.update(obs, running)
                    bar.update(1)
                    if self.updates % LOG_EVERY == 0 or self.updates == u0 + 1:
                        log.log(self.updates, env_steps=self.env_steps,
                                updates_per_s=(self.updates - u0) / self.train_time, **m)
                if self.stop is None:
                    self.evaluate(log)
                self.save()
        finally:
            bar.close()
            restore()
        if self.stop is not None:
            return signal_exit_code(self.stop)
        return 0


def main(args: Args) -> int:
    """Train (or resume) a stage-3 policy; returns 0, 143 after SIGTERM or 130 after SIGINT."""
    setup = prepare(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(args.seed)
    trainer = AgentTrainer(args, setup)
    if args.resume and (out / "ckpt").exists():
        trainer.load()
    log = JsonlLogger(out / "metrics.jsonl", tensorboard=False)
    t0, u0 = time.perf_counter(), trainer.updates
    try:
        code = trainer.run(log)
    finally:
        log.close()
        setup.envs.close()
    dt, n, tt = time.perf_counter() - t0, trainer.updates - u0, max(trainer.train_time, 1e-9)
    last = trainer.history[-1] if trainer.history else {}
    print(f"train-agent: {n} updates in {dt:.1f} s; training alone {n / tt:.2f} updates/s "
          f"({n * args.horizon * args.num_envs / tt:.0f} imagined env steps/s); init {setup.init}")
    if last:
        print(f"real {setup.game} return after {last['updates']} updates: {last['eval_return_mean']:.2f} "
              f"± {last['eval_return_std']:.2f} over "
              f"{f'the starts {args.eval_starts}' if args.eval_starts else f'{args.eval_episodes} episodes'} (greedy)")
    if trainer.history and (out / "best" / "agent.json").is_file():
        top = max(trainer.history, key=lambda r: r["eval_return_mean"])  # the first of equal bests, as saved
        again = ("no other games are left under the protocol" if args.eval_starts == "all" else
                 "score it on all the protocol's games with `ditwm evaluate agent --starts all`")
        print(f"best evaluation: {top['eval_return_mean']:.2f} ± {top['eval_return_std']:.2f} after {top['updates']} "
              f"updates, policy in {out / 'best'} (chosen on these games; {again})")
    if code == 0:
        print(f"policy: {trainer.export()}")
    return code


def cli(argv: list[str] | None = None) -> int:
    return run_cli(Args, main, "ditwm train-agent", argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(cli())
