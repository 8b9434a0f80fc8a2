"""Bad input to every command, through the real command line in a subprocess: exit code 2, one line
``bg <command>: error: …`` naming the input and the fix, and no traceback (issue: your own molecule)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def bg(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONPATH": str(ROOT)}
    env.pop("BG_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "bg", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def assert_one_line_error(out: subprocess.CompletedProcess, command: str, pattern: str) -> str:
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert "Traceback" not in text, text
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, text
    assert errors[0].startswith(f"{command}: error: "), text
    assert re.search(pattern, errors[0]), errors[0]
    assert "usage:" not in out.stderr, text
    return errors[0]


@pytest.fixture()
def user_files(tmp_path, aldp_md_dir):
    """A user's own MD without bg's record beside it: a topology and a DCD."""
    shutil.copy(aldp_md_dir / "topology.pdb", tmp_path / "top.pdb")
    shutil.copy(next((aldp_md_dir / "chunks").glob("chunk_*.dcd")), tmp_path / "run.dcd")
    (tmp_path / "traj.txt").write_text("1.0 2.0 3.0\n")
    return tmp_path


# -------------------------------------------------------------------- bg fit (LightningCLI)
def test_config_without_its_data_names_the_topology_and_the_data_command(tmp_path):
    out = bg("fit", "--config", CONFIGS / "hp35_nsf.yaml", cwd=tmp_path)
    assert_one_line_error(out, "bg fit", r"data/villin_1vii_hbonds/md/topology.pdb: topology file not found.*`bg data`")


def test_negative_batch_size(tmp_path):
    out = bg("fit", "--config", CONFIGS / "aldp_nsf.yaml", "--data.init_args.batch_size=-5", cwd=tmp_path)
    assert_one_line_error(out, "bg fit", r"batch_size must be ≥ 1, got -5")


def test_misspelled_option_suggests_the_nearest_name(tmp_path):
    out = bg("fit", "--config", CONFIGS / "aldp_nsf.yaml", "--model.init_args.widht=3", cwd=tmp_path)
    assert_one_line_error(out, "bg fit", r"--model.init_args.widht: SplitChannelNSF has no option 'widht'; "
                                         r"did you mean 'width'\?")


def test_wrong_value_type_and_choice(tmp_path):
    out = bg("fit", "--config", CONFIGS / "aldp_nsf.yaml", "--model.init_args.conditioner=foo", cwd=tmp_path)
    assert_one_line_error(out, "bg fit", r"--model.init_args.conditioner: expected one of 'gau', 'mlp', got 'foo'")


def test_yaml_error_names_its_file_and_line(tmp_path):
    (tmp_path / "mine.yaml").write_text("trainer:\n  max_epochs: [1\n")
    out = bg("fit", "--config", CONFIGS / "aldp_nsf.yaml", "--config", "mine.yaml", cwd=tmp_path)
    assert_one_line_error(out, "bg fit", r"--config mine.yaml line \d+, column \d+: YAML syntax error")


def test_missing_config_file(tmp_path):
    out = bg("fit", "--config", "configs/aldp_nfs.yaml", cwd=tmp_path)
    assert_one_line_error(out, "bg fit", r"--config configs/aldp_nfs.yaml: no such file")


def test_validation_every_epoch_with_a_metric_evaluated_every_second(tmp_path, aldp_data_args):
    """A natural change (validate every epoch) is refused at set-up, not after the first epoch."""
    out = bg("fit", "--config", CONFIGS / "aldp_nsf.yaml", "--trainer.check_val_every_n_epoch=1",
             "--data.init_args.system=null", "--data.init_args.generator=md",
             f"--data.init_args.topology={aldp_data_args['topology']}",
             f"--data.init_args.trajectories=[{aldp_data_args['trajectories'][0]}]",
             "--model.init_args.width=16", "--model.init_args.backbone_layers=2", cwd=tmp_path)
    assert_one_line_error(out, "bg fit", r"check_val_every_n_epoch 1 .*ModelCheckpoint\(monitor='val/ess'\).*"
                                         r"multiple of 4")


# -------------------------------------------------------------------- bg data
def test_unreadable_trajectory_format(user_files):
    out = bg("data", "--topology", "top.pdb", "--trajectories", "traj.txt", "--forcefield", "amber99sbildn-obc",
             cwd=user_files)
    assert_one_line_error(out, "bg data", r"traj.txt: mdtraj has no reader for '.txt' files")


def test_own_trajectories_need_a_force_field(user_files):
    out = bg("data", "--topology", "top.pdb", "--trajectories", "run.dcd", cwd=user_files)
    assert_one_line_error(out, "bg data", r"data.forcefield is required with your own trajectories")


def test_force_field_other_than_the_mds_is_refused(tmp_path, aldp_md_dir):
    out = bg("data", "--topology", aldp_md_dir / "topology.pdb", "--trajectories", aldp_md_dir / "chunks" / "*.dcd",
             "--forcefield", "amber14-obc2", cwd=tmp_path)
    assert_one_line_error(out, "bg data", r"amber14-obc2 .* is not the force field of the MD \(amber99sbildn.xml")


def test_cached_md_with_other_settings_names_the_setting(tmp_path):
    def md_args(steps_per_frame: int) -> list[str]:
        return ["data", "--system", "aldp", "--cache-dir", "cache", "--n-frames", "4", "--steps-per-frame",
                str(steps_per_frame), "--equilibration-steps", "10", "--chunk-frames", "4"]

    first = bg(*md_args(10), "--threads", "1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert bg(*md_args(10), "--threads", "2", cwd=tmp_path).returncode == 0  # threads change no physics
    out = bg(*md_args(20), cwd=tmp_path)
    assert_one_line_error(out, "bg data", r"holds an MD run with other settings \(steps_per_frame: 10 here, 20 asked\)")


def test_unknown_option_and_choice(tmp_path):
    assert_one_line_error(bg("data", "--stirde", "2", cwd=tmp_path), "bg data",
                          r"unrecognized argument --stirde; did you mean '--stride'\?")
    assert_one_line_error(bg("data", "--generator", "foo", cwd=tmp_path), "bg data",
                          r"--generator: no such choice 'foo' \(choose from md, replica_exchange\)")
    assert_one_line_error(bg("fti", cwd=tmp_path), "bg", r"no such choice 'fti'; did you mean 'fit'\?")


# -------------------------------------------------------------------- bg analyze, bg sweep-command
def test_analyze_and_sweep_missing_files(tmp_path):
    assert_one_line_error(bg("analyze", "missing.ckpt", cwd=tmp_path), "bg analyze", r"missing.ckpt: checkpoint not found")
    assert_one_line_error(bg("sweep-command", "missing.yaml", cwd=tmp_path), "bg sweep-command", r"missing.yaml")


def test_debug_shows_the_traceback(tmp_path):
    out = bg("analyze", "missing.ckpt", "--debug", cwd=tmp_path)
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_abbreviated_options_are_typos_not_prefixes(tmp_path, monkeypatch, capsys):
    """argparse would read ``--trainer.max_epoch`` as ``--trainer.max_epochs``; bg reports it (in-process
    ``bg.cli.main``: the same code as the subprocesses above, without a second interpreter start)."""
    from bg.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BG_DEBUG", raising=False)
    assert main(["fit", "--config", str(CONFIGS / "aldp_nsf.yaml"), "--trainer.max_epoch=1", "--print_config"]) == 2
    assert "bg fit: error: unrecognized arguments: --trainer.max_epoch=1; did you mean '--trainer.max_epochs'?" \
        in capsys.readouterr().err
    assert main(["data", "--strid", "2"]) == 2
    assert "did you mean '--stride'?" in capsys.readouterr().err
