"""`ditwm pretrain --init BUNDLE`: fine-tuning from a released (fp16) DiT bundle, and what such an --init refuses."""
import json
from pathlib import Path

import torch

from dit_envs.bundle import load_bundle, save_bundle
from trainers.checkpoint import load_checkpoint
from trainers.pipeline import release_bundle
from trainers.pretrain import Args, main

TINY = dict(preset="tiny", batch=8, warmup=2, log_every=2, eval_every=0, checkpoint_every=4, start_contexts=8,
            eval_windows=8, eval_horizon=8, threads=1)


def pretrain(argv: list[str]) -> int:
    from trainers import cli

    return cli.main(["pretrain", *argv])


def test_init_from_an_fp16_release_starts_from_its_weights(tiny_stage1_store, teacher_bundle, tmp_path, capsys):
    base, _ = load_checkpoint(teacher_bundle.parent)
    # A float16 release (the store's own encoder) whose latent standardisation differs from the store's: the
    # fine-tune must take the bundle's, not recompute it from the data.
    b = load_bundle(teacher_bundle)
    mean, std = b.model.latent_mean + 0.25, b.model.latent_std * 2
    b.model.set_latent_stats(mean, std)
    rel = save_bundle(b.model, tmp_path / "release", game=b.config["game"],
                      action_meanings=list(b.config["action_meanings"]), start_z=b.start_z, start_a=b.start_a,
                      dtype=torch.float16)
    assert json.loads((rel / "config.json").read_text())["dtype"] == "float16"
    # A vanishing learning rate: the fine-tune keeps the release's weights (the base EMA rounded to float16).
    assert main(Args(data=str(tiny_stage1_store), out=str(tmp_path / "ft"), steps=3, init=str(rel), lr=1e-12,
                     weight_decay=0.0, **TINY)) == 0
    assert f"from {rel}" in capsys.readouterr().out
    ft, meta = load_checkpoint(tmp_path / "ft")
    assert meta["step"] == 3 and meta["context_len"] == json.loads((rel / "config.json").read_text())["context_len"]
    ema_keys = [k for k in base if k.startswith("ema.")]
    assert ema_keys and sorted(ema_keys) == sorted(k for k in ft if k.startswith("ema."))
    for k in ema_keys:
        want = base[k].half().float()
        assert torch.allclose(ft[k], want, atol=1e-6), k
        assert torch.allclose(ft["net." + k[4:]], want, atol=1e-6), k
    assert torch.allclose(ft["latent_mean"], mean) and torch.allclose(ft["latent_std"], std)
    assert not torch.allclose(ft["latent_mean"], base["latent_mean"])
    # The fine-tune resumes, and its own output is an --init source as before.
    assert main(Args(data=str(tiny_stage1_store), out=str(tmp_path / "ft"), steps=5, init=str(rel), resume=True,
                     **TINY)) == 0
    assert load_checkpoint(tmp_path / "ft")[1]["step"] == 5


def test_init_bundle_refusals_name_the_field_and_write_nothing(tiny_stage1_store, teacher_bundle, tmp_path,
                                                                capsys):
    base = ["--data", str(tiny_stage1_store), "--steps", "2", "--preset", "tiny", "--threads", "1"]
    cases = (
        # the shipped model was trained on another autoencoder than this store's stage 1
        (["--init", "DiTWM/Pong-v0"], "--init", "autoencoder"),
        # not a DiT world model: the store's stage-1 RSSM bundle
        (["--init", str(tiny_stage1_store / "stage1" / "rssm")], "--init", "model_type"),
        # the tiny teacher is not an S network
        (["--init", str(teacher_bundle), "--preset", "S"], "--", "the --init run's"),
        (["--init", str(tmp_path / "none")], "--init", "none"),
        (["--init", str(teacher_bundle / "config.json")], "--init", "config.json"),  # a file, not a directory
        (["--init", "DiTWM/NoSuchGame-v0"], "--init", "DiTWM/NoSuchGame-v0"),  # an env id nobody registered
    )
    for i, (extra, field, words) in enumerate(cases):
        out = tmp_path / f"x{i}"
        assert pretrain([*base, "--out", str(out), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert field in err and words in err, err
        assert not out.exists()
    # A bundle whose weights were altered after release fails its sha256 check, named.
    rel = release_bundle(teacher_bundle, tmp_path / "rel")
    dyn = rel / "dynamics.safetensors"
    dyn.write_bytes(dyn.read_bytes()[:-8] + bytes(8))
    assert pretrain([*base, "--out", str(tmp_path / "y"), "--init", str(rel)]) == 2
    err = capsys.readouterr().err
    assert "--init" in err and "dynamics.safetensors" in err and not Path(tmp_path / "y").exists()
