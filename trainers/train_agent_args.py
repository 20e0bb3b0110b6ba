"""The options of ``ditwm train-agent`` (:mod:`trainers.train_agent`): one dataclass, its CLI flags and help."""
from __future__ import annotations

from dataclasses import dataclass

from trainers.common import arg, dtype_arg


@dataclass(kw_only=True)
class Args:
    world_model: str = arg(help="DiTWM/<Game>-v<k>, a bundle directory or hf:// source, rssm:STAGE1_DIR, or "
                                "real:STAGE1_DIR (the real game through the stage-1 encoder: a perfect model)")
    steps: int = arg(help="actor-critic updates in total (each: --horizon batched steps of --num-envs envs)")
    out: str = arg(help="run directory (new or empty unless --resume)")
    init: str = arg("auto", "stage1:DIR (start from the frozen stage-1 actor-critic), policy:DIR (from a policy "
                            "directory, e.g. an earlier train-agent --out: continue it in another world model), "
                            "scratch, or auto (the stage-1 dir of an rssm: or real: world model or of a bundle "
                            "inside one)")
    num_envs: int = arg(256, "parallel imagined envs")
    horizon: int = arg(15, "imagined steps per update (DreamerV3: 15)")
    eval_every: int = arg(100, "updates between real-game evaluations and checkpoints (0: only at the end)")
    eval_episodes: int = arg(10, "real-game episodes per evaluation (DESIGN.md §4: >= 10)")
    eval_max_steps: int = arg(27_000, "per-episode step cap of the real game (protocol: 27000)")
    eval_seed: int = arg(-1, "reset seed of the real-game evaluations (-1: --seed); a fixed one scores every "
                             "evaluation, of this run and of others, on the same games (paired comparisons)")
    eval_starts: str = arg("", "score on one game per start instead of --eval-episodes random ones: 'all' (the "
                               "protocol's 30; a greedy policy's exact score) or 'A:B' (ditwm evaluate agent --starts)")
    episode_steps: int = arg(0, "imagined episode length before truncation (0: the env's default)")
    start_data: str = arg("", "episode store to draw imagination start contexts from instead of the bundle's "
                              "(DIAMOND: the replay buffer), encoded with the world model's encoder")
    start_contexts: int = arg(4096, "with --start-data: how many start contexts to draw (seeded by --seed)")
    sampling_steps: int = arg(0, "denoising steps per imagined step (0: the bundle's default)")
    temperature: float | None = arg(None, "sampling temperature: std of the initial noise (default: the "
                                          "bundle's; DiT models only)")
    sampling_shift: float | None = arg(None, "time shift of the sampler's steps (default: the bundle's; DiT "
                                             "teachers only): > 1 spends more steps at high noise, where the "
                                             "sample decides whether a small object is there")
    keep_ball: int = arg(0, "Pong: draw an imagined step again up to this many times when it loses the ball (0: off)")
    lost_ball_reward: float | None = arg(None, "with --keep-ball: reward of a step lost in every draw (e.g. -1)")
    lost_ball_truncate: bool = arg(False, "with --keep-ball: undo a step lost in every draw; its episode ends there")
    keep_ball_returns: bool = arg(False, "with --keep-ball: also draw again a return without the paddle")
    rejection_penalty: float = arg(0.0, "with --keep-ball: subtracted from the reward of every step whose first draw "
                                        "the rule rejects, on top of --lost-ball-reward (MOPO-style; 0: off)")
    uncertainty_penalty: float = arg(0.0, "subtracted from the reward of every imagined step whose spread of "
                                          "--uncertainty-draws draws passes its --uncertainty-quantile on real "
                                          "start contexts (MOReL/MOPO-style pessimism; 0: off)")
    uncertainty_truncate: bool = arg(False, "end an imagined episode at a step whose draw spread passes the "
                                            "threshold (the learner bootstraps there; MBPO/MOReL-style)")
    uncertainty_draws: int = arg(4, "with --uncertainty-penalty or --uncertainty-truncate: draws per imagined step "
                                    "(>= 2; each costs a model step)")
    uncertainty_quantile: float = arg(0.9, "with --uncertainty-penalty or --uncertainty-truncate: the spread's "
                                           "threshold, as its quantile over one step from the start contexts with "
                                           "random actions")
    lr: float = arg(3e-5, "Adam learning rate of actor and critic (DreamerV3: 3e-5)")
    gamma: float = arg(0.997, "discount of the λ-returns (DreamerV3: 0.997, a 333-step horizon)")
    entropy_coef: float = arg(3e-4, "entropy bonus η of the actor loss (DreamerV3: 3e-4, on advantages divided "
                                    "by max(1, return range))")
    kl_coef: float = arg(0.0, "with --init policy:DIR or stage1:DIR: weight β of KL(π_init ‖ π) on the imagined "
                              "states, added to the actor loss — a trust region around the policy whose real play "
                              "the world model was fitted to (BREMEN, Matsushima et al. 2021); 0: off")
    epochs: int = arg(1, "passes over each rollout (1: DreamerV3's one gradient step; more: PPO's clipped "
                         "surrogate, Schulman et al. 2017, so each imagined step is learned from several times)")
    minibatches: int = arg(1, "gradient steps per pass, each on a 1/M share of the envs (with --epochs)")
    clip: float = arg(0.2, "PPO's ratio clip ε (with --epochs or --minibatches > 1)")
    hidden: int = arg(256, "scratch only: MLP width of actor and critic (stage 1's default)")
    device: str = arg("cpu", "torch device of world model and agent (cpu, cuda, auto)")
    dtype: str = dtype_arg("; so does its encoder for start contexts, not the real-game evaluation's (float32); "
                           "the agent stays float32")
    seed: int = arg(0, "seed of envs, policy sampling and (scratch) initialisation")
    resume: bool = arg(False, "continue the run in --out from its checkpoint")


# Settings a resumed run must share with the run it continues (each refused by name when it differs).
RESUME_CHECKED = ("world_model", "init", "hidden", "temperature", "sampling_shift", "gamma", "entropy_coef",
                  "start_data", "start_contexts", "epochs", "minibatches", "clip", "keep_ball", "lost_ball_reward",
                  "keep_ball_returns", "lost_ball_truncate", "rejection_penalty", "uncertainty_penalty",
                  "uncertainty_truncate", "uncertainty_draws", "uncertainty_quantile", "kl_coef")
