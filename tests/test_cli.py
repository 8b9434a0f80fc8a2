import subprocess
import sys

from bg.cli import main


def test_bg_data_generates_and_reports(tmp_path, capsys):
    rc = main(["data", "--system", "aldp", "--cache-dir", str(tmp_path), "--n-frames", "20", "--steps-per-frame", "20",
               "--equilibration-steps", "0", "--chunk-frames", "10"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "aldp, 22 atoms" in out and "frames: train 16, val 2, test 2" in out
    assert (tmp_path / "aldp" / "md" / "chunks" / "chunk_00001.dcd").exists()


def test_bg_data_bad_input_is_one_line(tmp_path, capsys):
    rc = main(["data", "--topology", str(tmp_path / "missing.pdb"), "--trajectories", "x.dcd"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "missing.pdb: topology file not found" in err[0]


def test_python_dash_m_bg():
    out = subprocess.run([sys.executable, "-m", "bg", "--help"], capture_output=True, text=True, check=True).stdout
    assert "data" in out


def test_bg_data_replica_exchange_reports_the_exchange(tmp_path, capsys):
    rc = main(["data", "--system", "aldp", "--cache-dir", str(tmp_path), "--generator", "replica_exchange",
               "--re-n-iterations", "8", "--re-steps-per-iteration", "20", "--re-n-replicas", "2",
               "--re-equilibration-iterations", "0", "--re-block-iterations", "4", "--re-walkers", "2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "replica exchange: 2 walkers × 2 replicas" in out
    assert "frames: train" in out and "left out between blocks" in out
    assert (tmp_path / "aldp" / "replica_exchange" / "frames" / "walker_01.dcd").exists()
