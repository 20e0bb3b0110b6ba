"""The real Atari game under the Atari-100k protocol of DreamerV3 and DIAMOND (DESIGN.md §2).

ale-py's native C++ vector env (``AtariVectorEnv``) with: frameskip 4, max-pool over the last two frames,
sticky actions off (``repeat_action_probability=0``), up to 30 no-ops at reset, minimal action set, raw
(unclipped) rewards, no fire-reset, no episodic life, 64×64 RGB. Observations are uint8 channel-first
``(N, 3, 64, 64)``, the format of the imagination env, so a policy moves between them unchanged.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorWrapper

IMAGE_SIZE = 64

#: The protocol's fixed settings, passed explicitly: ale-py's and ``gym.make_vec("ALE/...")``'s defaults differ.
PROTOCOL: dict[str, Any] = dict(
    frameskip=4,
    maxpool=True,
    repeat_action_probability=0.0,
    noop_max=30,
    full_action_space=False,
    reward_clipping=False,
    use_fire_reset=False,
    episodic_life=False,
    grayscale=False,
    stack_num=1,
    img_height=IMAGE_SIZE,
    img_width=IMAGE_SIZE,
    max_num_frames_per_episode=108_000,
)


def rom_id(game: str) -> str:
    """``"Pong"`` / ``"MsPacman"`` / ``"ms_pacman"`` → ale-py ROM id (``"pong"``, ``"ms_pacman"``).

    Raises:
        ValueError: ``game`` names no ROM shipped with ale-py (the message lists a few valid names).
    """
    import ale_py.roms as roms

    if not isinstance(game, str) or not game:
        raise ValueError(f"game: expected an Atari game name such as 'Pong', got {game!r}")
    rid = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", game).lower()
    known = roms.get_all_rom_ids()
    if rid not in known:
        raise ValueError(f"game: expected one of ale-py's {len(known)} games (e.g. Pong, Breakout, MsPacman), "
                         f"got {game!r}")
    return rid


@lru_cache(maxsize=None)
def action_meanings(game: str) -> tuple[str, ...]:
    """Names of the game's minimal action set, in action-index order (Pong: NOOP, FIRE, RIGHT, LEFT, ...)."""
    from ale_py import ALEInterface, LoggerMode, roms

    ALEInterface.setLoggerMode(LoggerMode.Error)
    ale = ALEInterface()
    ale.loadROM(roms.get_rom_path(rom_id(game)))
    return tuple(a.name for a in ale.getMinimalActionSet())


class RealAtariVectorEnv(VectorWrapper):
    """Channel-first view of ale-py's ``AtariVectorEnv`` under the fixed protocol.

    Observations: uint8 ``(N, 3, 64, 64)``. Actions: int ``(N,)`` in ``[0, len(action_meanings))``.
    Autoreset: SAME_STEP; on the step where env ``i`` ends, ``obs[i]`` is the first frame of its next
    episode, ``info["final_obs"][i]`` (an object array, Gymnasium's convention) the last frame of the ended one
    and ``info["_final_obs"][i]`` is True.
    Attributes ``game`` and ``action_meanings`` describe the game.
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(self, env: gym.vector.VectorEnv, game: str) -> None:
        super().__init__(env)
        self.game = game
        self.action_meanings = action_meanings(game)
        n = env.num_envs
        self.single_observation_space = gym.spaces.Box(0, 255, (3, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        self.observation_space = gym.spaces.Box(0, 255, (n, 3, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        self.single_action_space = gym.spaces.Discrete(len(self.action_meanings))
        self.action_space = gym.spaces.MultiDiscrete(np.full(n, len(self.action_meanings)))

    @staticmethod
    def _chw(obs: np.ndarray) -> np.ndarray:
        # ale-py gives (N, stack=1, H, W, 3); we serve (N, 3, H, W).
        return np.ascontiguousarray(obs[:, 0].transpose(0, 3, 1, 2))

    def reset(self, *, seed: int | list[int] | None = None, options: dict | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        return self._chw(obs), info

    def step(self, actions):
        actions = np.asarray(actions)
        if actions.shape != (self.num_envs,):
            raise ValueError(f"actions: expected shape ({self.num_envs},), got {actions.shape}")
        if not np.issubdtype(actions.dtype, np.integer):
            raise TypeError(f"actions: expected an integer dtype, got {actions.dtype}")
        n_act = len(self.action_meanings)
        if actions.min() < 0 or actions.max() >= n_act:
            raise ValueError(f"actions: expected values in [0, {n_act}), got min {actions.min()} max {actions.max()}")
        obs, reward, terminated, truncated, raw_info = self.env.step(actions.astype(np.int64))
        info = dict(raw_info)
        done = terminated | truncated
        info.pop("final_obs", None)
        if done.any() and "final_obs" in raw_info:
            # Gymnasium's convention: an object array holding the last observation of each ended env.
            final = self._chw(raw_info["final_obs"])
            info["final_obs"] = np.full(self.num_envs, None, dtype=object)
            info["final_obs"][np.flatnonzero(done)] = list(final[done])
            info["_final_obs"] = done.copy()
        return self._chw(obs), reward.astype(np.float32), terminated, truncated, info


def make_real_env(game: str = "Pong", num_envs: int = 1, seed: int | None = None, *,
                  num_threads: int = 0, **overrides: Any) -> RealAtariVectorEnv:
    """Make the real game as a natively batched vector env under the Atari-100k protocol (DESIGN.md §2).

    Args:
        game: Atari game name as in ``ALE/<Game>-v5`` (``"Pong"``); see :func:`rom_id`.
        num_envs: number of parallel games (>= 1).
        seed: if given, the env is reset once with it so the first ``reset()`` without seed is reproducible.
        num_threads: ale-py worker threads (0 = one per env, capped by ale-py).
        overrides: protocol settings to change (keys of :data:`PROTOCOL`), e.g. ``max_num_frames_per_episode``
            for short test episodes. Changing ``img_height``/``img_width``/``grayscale``/``stack_num`` is refused.
    Returns:
        :class:`RealAtariVectorEnv` with uint8 observations ``(num_envs, 3, 64, 64)``.
    Raises:
        ValueError: unknown ``game``, ``num_envs`` < 1, or an unknown / fixed protocol override.
    """
    from ale_py.vector_env import AtariVectorEnv

    rid = rom_id(game)
    if not isinstance(num_envs, (int, np.integer)) or isinstance(num_envs, bool) or num_envs < 1:
        raise ValueError(f"num_envs: expected an integer >= 1, got {num_envs!r}")
    fixed = {"img_height", "img_width", "grayscale", "stack_num"}
    for k in overrides:
        if k not in PROTOCOL:
            raise ValueError(f"{k}: expected one of the protocol settings {sorted(PROTOCOL)}, got unknown key {k!r}")
        if k in fixed:
            raise ValueError(f"{k}: fixed by the observation format at {PROTOCOL[k]!r}, got {overrides[k]!r}")
    env = AtariVectorEnv(rid, int(num_envs), num_threads=num_threads, autoreset_mode="SameStep",
                         **{**PROTOCOL, **overrides})
    wrapped = RealAtariVectorEnv(env, game)
    if seed is not None:
        wrapped.reset(seed=seed)
    return wrapped


def parse_starts(spec: str, noop_max: int | None = None) -> list[int] | None:
    """Read a set of reset starts: the no-op counts whose games an exhaustive evaluation plays, one game each.

    With sticky actions off the game is deterministic, so a start (the number of no-op frames ale-py plays at
    reset, uniform over ``0 … noop_max − 1``) fixes the whole game of a deterministic policy: the protocol holds
    ``noop_max`` (30) distinct games, and the mean over all of them is a greedy policy's exact expected return.

    Args:
        spec: ``""`` (none: draw games at random), ``"all"`` (the protocol's ``0 … noop_max − 1``) or ``"A:B"``
            (no-op counts ``A … B − 1``; e.g. ``"30:60"``, starts the protocol never draws, for choosing a policy
            without looking at the protocol's games).
        noop_max: the protocol's (default: :data:`PROTOCOL`'s 30).
    Returns:
        the no-op counts (sorted ints), or ``None`` for ``""``.
    Raises:
        ValueError: ``starts`` malformed or an empty / negative range (names the field and the value).
    """
    noop_max = PROTOCOL["noop_max"] if noop_max is None else noop_max
    if spec == "":
        return None
    if spec == "all":
        return list(range(noop_max))
    a, sep, b = spec.partition(":")
    try:
        lo, hi = int(a), int(b)
    except ValueError:
        lo = hi = -1
    if not sep or lo < 0 or hi <= lo:
        raise ValueError(f"starts: expected '', 'all' or 'A:B' with 0 <= A < B (no-op counts A … B-1), "
                         f"got {spec!r}")
    return list(range(lo, hi))


def _predicted_count(seed: int, noop_max: int) -> int:
    """The no-op count ale-py draws at a reset with ``seed``: ``std::mt19937(seed)`` (numpy's legacy
    ``RandomState`` is the same generator) through libstdc++'s ``uniform_int_distribution(0, noop_max - 1)``
    (Lemire's multiply-and-reject). A prediction only: :func:`make_start_env` checks it against the env."""
    words = np.frombuffer(np.random.RandomState(seed).bytes(4 * 64), dtype="<u4")
    threshold = (2**32 - noop_max) % noop_max
    for w in words.tolist():
        product = w * noop_max
        if product & 0xFFFFFFFF >= threshold:
            return product >> 32
    return -1  # 64 rejections in a row: practically never; the caller moves on to the next seed


def start_seeds(game: str, starts: list[int], noop_max: int, scan: bool = False, block: int = 64,
                max_seed: int = 1_000_000) -> np.ndarray:
    """Reset seeds under which ale-py's env begins with exactly ``starts[i]`` no-op frames.

    ale-py draws the count from a generator seeded by the reset seed and reports it as the episode frame number
    right after reset. Seeds ``0, 1, …`` are searched in order and the first seed of each wanted count is kept,
    so the answer is the same on every run: predicted from the generator (fast), or with ``scan`` by resetting
    ``block`` real envs at a time and reading the count (about 15 s for the protocol's 30).

    Args:
        game: as :func:`make_real_env`. starts: wanted counts, each in ``[0, noop_max)``. noop_max: the env's.
    Returns:
        int64 ``(len(starts),)`` seeds, aligned with ``starts``.
    Raises:
        ValueError: a count outside ``[0, noop_max)``. RuntimeError: no seed below ``max_seed`` gives one.
    """
    bad = [s for s in starts if not 0 <= s < noop_max]
    if bad:
        raise ValueError(f"starts: expected no-op counts in [0, {noop_max}), got {bad}")
    found: dict[int, int] = {}
    env = make_real_env(game, num_envs=block, noop_max=noop_max) if scan else None
    try:
        for base in range(0, max_seed, block):
            if env is None:
                counts = [_predicted_count(base + i, noop_max) for i in range(block)]
            else:
                counts = np.asarray(env.reset(seed=base)[1]["episode_frame_number"]).tolist()
            for i, n in enumerate(counts):
                found.setdefault(int(n), base + i)
            if all(s in found for s in starts):
                return np.array([found[s] for s in starts], dtype=np.int64)
    finally:
        if env is not None:
            env.close()
    raise RuntimeError(f"starts: no reset seed below {max_seed} gives the no-op counts "
                       f"{[s for s in starts if s not in found]}")


def make_start_env(game: str, starts: list[int],
                   **overrides: Any) -> tuple[RealAtariVectorEnv, np.ndarray, np.ndarray]:
    """One real game per start: ``len(starts)`` envs, reset so that env ``i`` begins with ``starts[i]`` no-ops.

    The env's ``noop_max`` is the protocol's, or ``max(starts) + 1`` for starts beyond it. The seeds are first
    predicted (:func:`start_seeds`), and scanned on the real env when a count does not come out as predicted.
    Returns ``(env, first observations uint8 (N, 3, 64, 64), seeds int64 (N,))``: ``env.reset(seed=seeds)``
    (also through a wrapper) begins the same games again; after its first episode each env autoresets to a
    random start as usual.

    Raises:
        ValueError: bad ``starts`` or overrides (as :func:`make_real_env`). RuntimeError: the counts still differ.
    """
    noop_max = max(overrides.pop("noop_max", PROTOCOL["noop_max"]), max(starts) + 1)
    env = make_real_env(game, num_envs=len(starts), noop_max=noop_max, **overrides)
    for scan in (False, True):
        seeds = start_seeds(game, starts, noop_max, scan=scan)
        obs, info = env.reset(seed=seeds)
        got = np.asarray(info["episode_frame_number"]).tolist()
        if got == list(starts):
            return env, obs, seeds
    env.close()
    raise RuntimeError(f"starts: expected games beginning with {list(starts)} no-op frames, ale-py gave {got}")
